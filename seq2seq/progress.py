"""What a user watches while a run trains: plain progress lines for log files, the progress bar in a
terminal, and one line per validation."""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar

from seq2seq.callbacks import best_checkpoint
from seq2seq.cli import log_to_files
from seq2seq.data.collate import Batch, target_tokens
from seq2seq.private_apis import should_update_logs
from seq2seq.run_clock import clock, elapsed_seconds, time_budget

log = logging.getLogger(__name__)


class ProgressLog(L.Callback):
    """Progress that reaches a log file and a terminal alike.

    When stdout is not a terminal (``> log``, nohup, a batch job) or the progress bar is off, a plain line
    about every ``every_seconds`` of training, on the console and in train.log: step, epoch, training
    loss, target tokens/s, time elapsed and time left before the first of ``trainer.max_time``,
    ``max_steps`` and ``max_epochs`` stops the run. In a terminal, the progress bar shows the time left
    instead (``left``), since its own estimate covers only the current epoch, and the training loss.
    The loss is read on logging steps (``trainer.log_every_n_steps``) only: reading it from the device
    is a wait.

    Elapsed is the run's clock (:mod:`seq2seq.run_clock`): the whole run, across resumes, as
    ``trainer.max_time`` counts it.
    """

    def __init__(self, every_seconds: float = 30.0) -> None:
        self.every_seconds = every_seconds
        self.total_tokens = 0  # also when fit trains nothing (resumed from the end of training)
        self.started: float | None = None  # while training: when this process began, for its rate

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.plain = trainer.progress_bar_callback is None or not sys.stdout.isatty()
        self.started = self.last_time = time.perf_counter()
        self.first_step = self.last_step = trainer.global_step
        self.tokens = 0
        self.total_tokens = 0  # this process's target tokens, for the run's mean rate (sweep summaries)
        self.loss: float | None = None  # as of the latest logging step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Batch, batch_idx: int
    ) -> None:
        tokens = target_tokens(batch)
        self.tokens += tokens
        self.total_tokens += tokens
        now = time.perf_counter()
        if should_update_logs(trainer) and "train_loss" in trainer.callback_metrics:
            self.loss = float(trainer.callback_metrics["train_loss"])
        if not self.plain:  # the progress bar shows them (ProgressBar.get_metrics)
            return
        if now - self.last_time < self.every_seconds or not trainer.is_global_zero:
            return
        loss = self.loss
        rate = self.tokens / (now - self.last_time)
        per_process = " per process" if trainer.world_size > 1 else ""
        left = self.time_left(trainer, now)
        log.info(
            "step %d | epoch %d | loss %s | %s target tokens/s%s | elapsed %s | left %s",
            trainer.global_step, trainer.current_epoch, "-" if loss is None else f"{loss:.3f}",
            f"{rate:,.0f}", per_process, clock(elapsed_seconds(trainer)),
            "unknown" if left is None else f"{clock(left[0])} ({left[1]})",
        )  # fmt: skip
        self.last_time, self.tokens = now, 0

    def bar_items(self, trainer: L.Trainer) -> dict[str, float | str]:
        """What the progress bar adds to Lightning's items: the training loss and the time left."""
        items: dict[str, float | str] = {}
        if self.loss is not None:
            items["train_loss"] = round(self.loss, 3)
        if self.started is not None and (left := self.time_left(trainer, time.perf_counter())) is not None:
            items["left"] = clock(left[0])
        return items

    def time_left(self, trainer: L.Trainer, now: float) -> tuple[float, str] | None:
        """Seconds left before the run stops (0 at the least), and which limit stops it; None before a rate
        is known. Like elapsed, max_time counts the whole run (the run's clock keeps it in checkpoints)."""
        estimates = []
        if (timer := time_budget(trainer)) is not None:
            estimates.append((max(timer.time_remaining(), 0.0), "max_time"))
        steps_done = trainer.global_step - self.first_step
        if steps_done > 0:
            seconds_per_step = (now - self.started) / steps_done
            if trainer.max_steps is not None and trainer.max_steps > 0:
                steps_left = max(trainer.max_steps - trainer.global_step, 0)
                estimates.append((steps_left * seconds_per_step, "max_steps"))
            batches = trainer.num_training_batches
            if trainer.max_epochs is not None and trainer.max_epochs > 0 and math.isfinite(batches):
                steps_per_epoch = batches / trainer.accumulate_grad_batches
                total = trainer.max_epochs * steps_per_epoch
                estimates.append((max(total - trainer.global_step, 0) * seconds_per_step, "max_epochs"))
        return min(estimates) if estimates else None


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar, with the training loss and the time left before the run stops
    from :class:`ProgressLog` (the bar's own estimate covers only the current epoch)."""

    def __init__(self, progress_log: ProgressLog) -> None:
        super().__init__()
        self.progress_log = progress_log  # not ``progress``: the rich bar's own attribute

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return super().get_metrics(trainer, pl_module) | self.progress_log.bar_items(trainer)


class ValidationLog(L.Callback):
    """One line per validation, as fairseq and OpenNMT-py print it: step, validation loss, BLEU, chrF,
    the best BLEU so far, and whether a new best checkpoint was saved (with per-corpus BLEU when the
    run trains on several corpora).

    Always in train.log; on the console too when stdout is not a terminal (in a terminal the progress
    bar shows the scores). Lightning runs checkpoint callbacks after all others, so the line is written
    at the next training hook, once the best checkpoint (the first ModelCheckpoint monitoring
    ``val_bleu``) has decided whether to save.
    """

    def __init__(self) -> None:
        self.pending: tuple[int, dict[str, float], str | None] | None = None  # step, metrics, best before

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()
                   if name.startswith(("val_loss", "val_bleu", "val_chrf"))}  # fmt: skip
        checkpoint = best_checkpoint(trainer)
        self.pending = (trainer.global_step, metrics, checkpoint.best_model_path if checkpoint else None)

    def flush(self, trainer: L.Trainer) -> None:
        if self.pending is None:
            return
        (step, metrics, best_before), self.pending = self.pending, None
        checkpoint = best_checkpoint(trainer)
        parts = [
            f"validation at step {step}",
            f"loss {metrics.get('val_loss', math.nan):.3f}",
            f"BLEU {metrics.get('val_bleu', math.nan):.2f}",
            f"chrF {metrics.get('val_chrf', math.nan):.2f}",
        ]
        by_corpus = {
            name.split("/", 1)[1]: value for name, value in metrics.items() if name.startswith("val_bleu/")
        }
        if by_corpus:
            parts.append(
                "BLEU by corpus " + ", ".join(f"{name} {value:.2f}" for name, value in by_corpus.items())
            )
        if checkpoint is not None and checkpoint.best_model_score is not None:
            saved = checkpoint.best_model_path != best_before
            parts.append(f"best BLEU {float(checkpoint.best_model_score):.2f}")
            parts.append(f"new best saved: {checkpoint.best_model_path}" if saved else "not a new best")
        line = " | ".join(parts)
        if sys.stdout.isatty():
            log_to_files(logging.INFO, line)
        else:
            log.info(line)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.flush(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush(trainer)
