"""A training run from a composed Hydra config: fit, then score the best checkpoint on the test split."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from seq2seq.data import TranslationDataModule
from seq2seq.module import TranslationModule
from seq2seq.sweep import write_result
from seq2seq.translator import SearchSettings, Translator, translate_file

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> float:
    """:func:`train` for the entry point: a failure is logged with its traceback and recorded as failed
    in the run's result.json (which sweep summaries read), then raised again."""
    started = time.perf_counter()
    try:
        return train(cfg)
    except Exception as err:
        log.exception("The run failed")
        minutes = (time.perf_counter() - started) / 60
        write_result(
            cfg.paths.output_dir, status="failed", error=f"{type(err).__name__}: {err}", train_minutes=minutes
        )
        raise


def train(cfg: DictConfig) -> float:
    """Train as ``cfg`` says, print the test scores of the best checkpoint, return its validation BLEU."""
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config_resolved.yaml", resolve=True)
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
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    train_minutes = (time.perf_counter() - started) / 60
    log.info("Training took %.1f minutes", train_minutes)

    checkpoint = trainer.checkpoint_callback
    if checkpoint is None or not checkpoint.best_model_path:
        raise RuntimeError("Training ended before any validation: no best checkpoint to evaluate")
    best_bleu = float(checkpoint.best_model_score)
    log.info("Best checkpoint: %s (validation BLEU %.2f)", checkpoint.best_model_path, best_bleu)
    if trainer.is_global_zero:
        if "test" in datamodule.texts:
            evaluate_test(cfg, checkpoint.best_model_path, datamodule, output_dir)
        write_result(
            output_dir, status="ok", val_bleu=best_bleu, train_minutes=train_minutes, parameters=parameters,
            checkpoint=checkpoint.best_model_path,
        )  # fmt: skip
    return best_bleu


def evaluate_test(
    cfg: DictConfig, checkpoint_path: str, datamodule: TranslationDataModule, output_dir: Path
) -> None:
    """Score the checkpoint on the test split exactly as ``translate.py ... ref=...`` would.

    The run directory keeps test.src, test.ref and test.hyp, so the figures can be reproduced.
    """
    test = datamodule.texts["test"]
    source, reference, hypothesis = (output_dir / f"test.{ext}" for ext in ("src", "ref", "hyp"))
    source.write_text("".join(line + "\n" for line in test.src), encoding="utf-8")
    reference.write_text("".join(line + "\n" for line in test.tgt), encoding="utf-8")
    settings = OmegaConf.to_container(cfg.evaluate, resolve=True)
    batch_tokens = settings.pop("batch_tokens")
    report = translate_file(
        Translator.from_checkpoint(checkpoint_path),
        str(source),
        str(hypothesis),
        SearchSettings(**settings),
        batch_tokens=batch_tokens,
        ref_path=str(reference),
        progress=False,
    )
    print(f"Test split ({test.origin}), beam {settings['beam']}, checkpoint {checkpoint_path}:\n{report}")
