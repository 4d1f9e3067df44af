"""A training run from a composed Hydra config: fit, then score the best checkpoint on the test split."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from seq2seq.callbacks import CarryBestCheckpoint, FinalValidation, best_checkpoint
from seq2seq.checkpoints import (
    check_architecture,
    check_resume_checkpoint,
    read_init_checkpoint,
    save_last_checkpoint,
)
from seq2seq.cli import is_user_error, log_to_files, one_line, quiet_third_party
from seq2seq.data.datamodule import TranslationDataModule
from seq2seq.errors import UserError
from seq2seq.evaluation import evaluate_best_checkpoint, evaluation_settings
from seq2seq.module import TranslationModule
from seq2seq.precision import resolve_decoding_precision, resolve_trainer_precision
from seq2seq.private_apis import agree_on_timed_validation, check_sigterm_on_logging_steps
from seq2seq.progress import ProgressBar, ProgressLog
from seq2seq.pruning import trial_pruning
from seq2seq.run_clock import clock_callbacks
from seq2seq.run_dir import discard_unused_run_dir, write_run_record
from seq2seq.slurm import SlurmRequeue, newest_checkpoint
from seq2seq.sweep import write_result
from seq2seq.tokenization import Tokenizer
from seq2seq.trial import TRIAL_ENV

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> float:
    """:func:`train` for the entry point, with third-party noise silenced. A failure is written to
    train.log (a user's mistake as one line, a bug with its traceback; the console gets it once, from
    seq2seq.cli) and recorded in the run's result.json (which sweep summaries read), then raised again.
    A single run that stops before writing anything of value leaves no run directory behind.

    Under DDP every process runs this with the same config and run directory; only the first process
    writes files there (the others log to the console only).
    """
    quiet_third_party()
    if rank_zero_only.rank != 0:
        for handler in [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]:
            logging.getLogger().removeHandler(handler)
            handler.close()
    started = time.perf_counter()
    try:
        return train(cfg)
    except Exception as err:
        if rank_zero_only.rank == 0:
            if is_user_error(err):
                log_to_files(logging.ERROR, f"error: {one_line(err)}")
            else:
                log_to_files(logging.ERROR, "The run failed", exc_info=True)
            if not discard_unused_run_dir(cfg.paths.output_dir):
                minutes = (time.perf_counter() - started) / 60
                error = f"{type(err).__name__}: {err}"
                write_result(cfg.paths.output_dir, status="failed", error=error, train_minutes=minutes)
        raise
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, SIGTERM (seq2seq.cli sets the exit status)
        if rank_zero_only.rank == 0 and not discard_unused_run_dir(cfg.paths.output_dir):
            minutes = (time.perf_counter() - started) / 60
            write_result(cfg.paths.output_dir, status="interrupted", train_minutes=minutes)
        raise


def train(cfg: DictConfig) -> float:
    """Train as ``cfg`` says, print the test scores of the best checkpoint, return its validation BLEU."""
    # Mistakes in the options that are only used later fail now, before any data is read.
    if missing := sorted(OmegaConf.missing_keys(cfg)):  # Hydra would drop them from a partial call
        raise UserError(
            f"Missing mandatory value(s): {', '.join(missing)} (give them on the command line: key=value)"
        )
    decoding = evaluation_settings(cfg)
    # trainer.precision=auto and evaluate.precision=auto probe the host's CPU bf16 (once per process).
    precision = resolve_trainer_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    initial = fine_tuning_checkpoint(cfg)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = cfg.get("ckpt_path")
    slurm = SlurmRequeue(output_dir) if SlurmRequeue.wanted() else None
    # A requeued SLURM job and a sweep's retry of a trial resume themselves: one whose time budget is spent
    # had finished training and goes on to the evaluation (a user's own resume is told to give more time).
    resumes_itself = bool(ckpt_path) and TRIAL_ENV in os.environ
    if slurm is not None:
        slurm.install()
        if ckpt_path is None and (ckpt_path := newest_checkpoint(output_dir)) is not None:
            log.info("Requeued SLURM job: resuming from %s", ckpt_path)
            resumes_itself = True
    if ckpt_path:
        max_time = cfg.trainer.get("max_time")  # "DD:HH:MM:SS", or a datetime.timedelta _target_
        check_resume_checkpoint(
            str(ckpt_path),
            instantiate(max_time) if isinstance(max_time, DictConfig) else max_time,
            training_may_be_done=resumes_itself,
        )
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("float32_matmul_precision"):  # "high": TF32 matrix products on GPUs that have them
        torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    if rank_zero_only.rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, output_dir / "config_resolved.yaml", resolve=True)
        write_run_record(output_dir / "run.json", cfg.seed)
    given_tokenizer = Tokenizer.from_state_dict(initial["tokenizer"]) if initial else None
    datamodule: TranslationDataModule = instantiate(cfg.data, given_tokenizer=given_tokenizer)
    # The model's vocabulary sizes are needed before fit, so the data is prepared and set up here, as
    # Lightning would do inside fit: prepared by local rank 0 of each node (or global rank 0 only, with
    # data.prepare_per_node=false) while the other processes wait for it.
    if slurm is not None:
        slurm.phase = "data preparation"
    datamodule.setup("fit")
    tokenizer = datamodule.tokenizer
    module: TranslationModule = instantiate(
        cfg.module,
        src_vocab_size=tokenizer.src_vocab_size,
        tgt_vocab_size=tokenizer.tgt_vocab_size,
        decoding=OmegaConf.to_container(cfg.decoding, resolve=True),
        tgt_lang=datamodule.tgt_lang,
        bleu_tokenize=cfg.evaluate.bleu_tokenize,
        _convert_="all",
    )
    if initial is not None:
        module.load_state_dict(initial["state_dict"])
        log.info(
            "Fine-tuning from %s (its weights, vocabulary and architecture; a new optimizer, schedule"
            " and data order)", cfg.init_from,
        )  # fmt: skip
    module.tokenizer = tokenizer
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    parameters = sum(p.numel() for p in module.parameters())
    log_run_start(cfg, tokenizer, parameters)

    # A best checkpoint even from a run shorter than val_check_interval; a validation every epoch at least
    final_validation = FinalValidation(every_epoch=cfg.evaluate.validate_every_epoch)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None] + [final_validation]
    callbacks += clock_callbacks(cfg.trainer.get("max_time"))  # the run's clock, also without max_time
    if ckpt_path:
        callbacks.append(CarryBestCheckpoint())
    if pruning := trial_pruning():  # a trial of hydra/sweeper=seq2seq: validations go to the study
        callbacks.append(pruning)
    loggers = [instantiate(c) for c in cfg.logger.values() if c is not None]
    # A progress bar only in a terminal: in a log file, its frames are noise (ProgressLog writes lines there).
    progress_bar = cfg.trainer.enable_progress_bar and sys.stdout.isatty()
    progress = next((c for c in callbacks if isinstance(c, ProgressLog)), None)
    if progress_bar and progress is not None:
        callbacks.append(ProgressBar(progress))
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers,
        precision=precision,
        enable_progress_bar=progress_bar,
    )
    check_sigterm_on_logging_steps(trainer, slurm)  # not a collective before every batch under DDP
    agree_on_timed_validation(trainer)  # a validation interval in seconds: one decision for all processes
    # The test split is decoded where training ran: checked there, before training.
    resolve_decoding_precision(cfg.evaluate.precision, trainer.strategy.root_device, "evaluate.precision")
    started = time.perf_counter()
    if slurm is not None:
        slurm.phase, slurm.trainer = "fit", trainer
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    train_minutes = (time.perf_counter() - started) / 60
    log.info("Training took %.1f minutes", train_minutes)
    save_last_checkpoint(trainer)
    if slurm is not None:  # a requeue asked for during fit and not yet acted on: now, last.ckpt saved
        slurm.fit_ended()

    checkpoint = best_checkpoint(trainer)
    if checkpoint is None or not checkpoint.best_model_path or checkpoint.best_model_score is None:
        interval = cfg.trainer.val_check_interval
        unit = {int: "batches", float: "of an epoch"}.get(type(interval), "of training (DD:HH:MM:SS)")
        raise UserError(
            "Training ended before any validation: no best checkpoint to evaluate"
            f" (validation runs every trainer.val_check_interval={interval} {unit})"
        )
    best_bleu = float(checkpoint.best_model_score)
    log.info("Best checkpoint: %s (validation BLEU %.2f)", checkpoint.best_model_path, best_bleu)
    if trainer.is_global_zero:
        pruned = pruning is not None and pruning.pruned_at is not None
        scores = {"test_bleu": None}  # a pruned trial: nothing more to learn from it
        if not pruned:
            scores = evaluate_best_checkpoint(
                checkpoint.best_model_path,
                trainer.strategy.root_device,
                {split: text for split in ("valid", "test") if (text := datamodule.text(split))},
                output_dir,
                decoding,
                cfg.evaluate,
                {split: m for split in ("valid", "test") if (m := datamodule.mixture_split(split))} or None,
                final_validation.count,
            )
        log.info(
            "Time by phase: validation %.0f s (%d validations while training), alpha tuning %s,"
            " test decoding %s",
            final_validation.seconds,
            final_validation.count,
            "-" if scores.get("alpha_seconds") is None else f"{scores['alpha_seconds']:.0f} s",
            "-" if scores.get("test_seconds") is None else f"{scores['test_seconds']:.0f} s",
        )
        write_result(
            output_dir,
            status="pruned" if pruned else "ok",
            val_bleu=best_bleu,
            train_minutes=train_minutes,
            steps=trainer.global_step,
            # Per process; a trial slowed by other work on the machine shows here.
            tokens_per_second=progress.total_tokens / (train_minutes * 60) if progress else None,
            parameters=parameters,
            precision=str(trainer.precision),
            checkpoint=checkpoint.best_model_path,
            **scores,
            **(pruning.record() if pruning else {}),
        )
    return best_bleu


def fine_tuning_checkpoint(cfg: DictConfig) -> dict[str, Any] | None:
    """``init_from``: the checkpoint to start from, read and checked, with ``cfg.model`` set to its
    architecture (so the run's config says what is trained); None without ``init_from``."""
    if not cfg.get("init_from"):
        return None
    if cfg.get("ckpt_path"):
        raise UserError(
            "ckpt_path (resume a run exactly) and init_from (a new run from a checkpoint's weights)"
            " exclude each other: give one"
        )
    checkpoint = read_init_checkpoint(cfg.init_from)
    model = checkpoint["hyper_parameters"]["model"]
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    check_architecture(OmegaConf.to_container(cfg.model, resolve=True), model, overrides)
    with open_dict(cfg):
        cfg.model = model
    return checkpoint


def log_run_start(cfg: DictConfig, tokenizer: Tokenizer, parameters: int) -> None:
    """What a user checks at the start of a run (the data module has logged the pairs per split): the
    vocabulary sentencepiece really built (it can be smaller than asked), the model, where outputs go."""
    asked = cfg.data.get("subword", {}).get("vocab_size")
    if tokenizer.joint:
        vocabulary = f"joint, {tokenizer.src_vocab_size:,} subwords"
    else:
        vocabulary = f"source {tokenizer.src_vocab_size:,}, target {tokenizer.tgt_vocab_size:,} subwords"
    log.info("Vocabulary: %s (data.subword.vocab_size=%s)", vocabulary, asked)
    log.info("Model: %s parameters", f"{parameters:,}")
    log.info("Outputs: %s", Path(cfg.paths.output_dir).resolve())
