"""Callbacks of a training run: progress for log files, FLOP counts and throughput, a checkpoint on
stopping, and the best checkpoint carried into a resumed run."""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ThroughputMonitor as LightningThroughputMonitor
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities.exceptions import SIGTERMException

from seq2seq.data.collate import Batch, target_tokens
from seq2seq.flops import training_flops
from seq2seq.lightning_private import should_update_logs

log = logging.getLogger(__name__)


def clock(seconds: float) -> str:
    """``H:MM:SS``."""
    return str(timedelta(seconds=round(seconds)))


class ProgressLog(L.Callback):
    """Progress that reaches a log file and a terminal alike.

    When stdout is not a terminal (``> log``, nohup, a batch job) or the progress bar is off, a plain line
    about every ``every_seconds`` of training, on the console and in train.log: step, epoch, training
    loss, target tokens/s, time elapsed and time left before the first of ``trainer.max_time``,
    ``max_steps`` and ``max_epochs`` stops the run. In a terminal, the progress bar shows the time left
    instead (``left``), since its own estimate covers only the current epoch.
    """

    def __init__(self, every_seconds: float = 30.0) -> None:
        self.every_seconds = every_seconds
        self.total_tokens = 0  # also when fit trains nothing (resumed from the end of training)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.plain = trainer.progress_bar_callback is None or not sys.stdout.isatty()
        self.started = self.last_time = time.perf_counter()
        self.first_step = self.last_step = trainer.global_step
        self.tokens = 0
        self.total_tokens = 0  # this process's target tokens, for the run's mean rate (sweep summaries)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Batch, batch_idx: int
    ) -> None:
        tokens = target_tokens(batch)
        self.tokens += tokens
        self.total_tokens += tokens
        now = time.perf_counter()
        if not self.plain:
            left = self.time_left(trainer, now)
            if left is not None:  # the dict the bar displays (Lightning's ProgressBar.get_metrics)
                trainer.progress_bar_metrics["left"] = clock(left[0])
            return
        if now - self.last_time < self.every_seconds or not trainer.is_global_zero:
            return
        loss = trainer.callback_metrics.get("train_loss")
        rate = self.tokens / (now - self.last_time)
        per_process = " per process" if trainer.world_size > 1 else ""
        left = self.time_left(trainer, now)
        log.info(
            "step %d | epoch %d | loss %s | %s target tokens/s%s | elapsed %s | left %s",
            trainer.global_step, trainer.current_epoch, "-" if loss is None else f"{float(loss):.3f}",
            f"{rate:,.0f}", per_process, clock(now - self.started),
            "unknown" if left is None else f"{clock(left[0])} ({left[1]})",
        )  # fmt: skip
        self.last_time, self.tokens = now, 0

    def time_left(self, trainer: L.Trainer, now: float) -> tuple[float, str] | None:
        """Seconds left before the run stops, and which limit stops it; None before a rate is known."""
        estimates = []
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        if timer is not None and timer.time_remaining() is not None:
            estimates.append((timer.time_remaining(), "max_time"))
        steps_done = trainer.global_step - self.first_step
        if steps_done > 0:
            seconds_per_step = (now - self.started) / steps_done
            if trainer.max_steps is not None and trainer.max_steps > 0:
                estimates.append(((trainer.max_steps - trainer.global_step) * seconds_per_step, "max_steps"))
            batches = trainer.num_training_batches
            if trainer.max_epochs is not None and trainer.max_epochs > 0 and math.isfinite(batches):
                steps_per_epoch = batches / trainer.accumulate_grad_batches
                total = trainer.max_epochs * steps_per_epoch
                estimates.append(((total - trainer.global_step) * seconds_per_step, "max_epochs"))
        return min(estimates) if estimates else None


class TrainingFlops(L.Callback):
    """Gives Lightning's ThroughputMonitor the FLOPs of each training batch (``flops_per_batch`` on the
    module, which it reads), from this project's count (seq2seq/flops.py), so that it logs FLOP/s, and
    MFU on the GPUs whose peak it knows. Validation decoding is not counted (None: no FLOP/s logged).
    """

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Batch, batch_idx: int
    ) -> None:
        pl_module.flops_per_batch = training_flops(pl_module.model, batch)

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        pl_module.flops_per_batch = None


class InterruptionCheckpoint(L.Callback):
    """When training stops on Ctrl-C, SIGTERM or an error: saves ``dirpath/last.ckpt`` (with the optimizer,
    to resume from) and says so in one log line, with the step and how to resume.

    SLURM's requeue signal (SIGUSR1 with ``#SBATCH --signal``) is Lightning's: it writes
    ``hpc_ckpt_N.ckpt`` into the run directory, from which the requeued job resumes by itself.
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, KeyboardInterrupt):
            reason = "Interrupted by Ctrl-C (SIGINT)"
        elif isinstance(exception, SIGTERMException):
            reason = "Stopped by SIGTERM"
        else:
            reason = f"Stopped by an error ({type(exception).__name__})"
        where = f"at step {trainer.global_step}, epoch {trainer.current_epoch}"
        if trainer.global_step == 0:
            if trainer.is_global_zero:
                log.warning("%s %s: nothing trained, no checkpoint saved", reason, where)
            return
        path = self.dirpath / "last.ckpt"
        try:
            trainer.save_checkpoint(path)
        except Exception as error:  # the original exception must still reach the user
            log.error("%s %s; saving %s failed: %s", reason, where, path, error)
            return
        if trainer.is_global_zero:
            log.warning("%s %s: saved %s; resume with ckpt_path=%s", reason, where, path, path)


class ThroughputMonitor(LightningThroughputMonitor):
    """Lightning's callback, timing only the batches whose logs are written.

    Lightning synchronises CUDA after every batch so that its clock reads the GPU's progress, which
    stalls the host's queue each step. Here every batch is counted, but the clock is read (after that
    synchronisation) only on logging steps (``trainer.log_every_n_steps``), so each rate spans whole
    logging intervals: ``window_size`` of them.
    """

    # Private (Lightning 2.6.6, see seq2seq/lightning_private.py): ``_update`` is where the parent counts
    # a batch and reads its clock, and its counters are ``_lengths``/``_samples``/``_batches``; no public
    # hook counts a batch without the clock. tests/test_lightning_private.py checks they exist.
    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, iter_num: int) -> None:
        if should_update_logs(trainer):
            super()._update(trainer, pl_module, batch, iter_num)
            return
        stage = trainer.state.stage
        if self.length_fn is not None:
            self._lengths[stage] += self.length_fn(batch)
        self._samples[stage] += self.batch_size_fn(batch)
        self._batches[stage] += 1


class CarryBestCheckpoint(L.Callback):
    """A run resumed into a new run directory keeps competing with the best checkpoint of the run it resumes.

    Lightning restores a checkpoint callback's best score only if its folder did not change; otherwise
    the next validation would become "best" whatever its score, and the test split would be scored with
    a worse model than the run already had. So the best checkpoint is copied into the new folder and the
    callback state points at the copy: later validations compete with it, and the test scores are those of
    the best model of the whole run. The old run directory is left as it was.
    """

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        states = checkpoint.get("callbacks", {})
        for callback in trainer.checkpoint_callbacks:
            state = states.get(callback.state_key)
            if not state or state.get("dirpath") in (None, callback.dirpath):
                continue  # not saved, or resumed in the same folder: Lightning restores it all
            best, score = state.get("best_model_path"), state.get("best_model_score")
            state.update(
                dirpath=callback.dirpath, best_model_path="", kth_best_model_path="", last_model_path=""
            )
            state["best_k_models"] = {}
            if not callback.monitor or not best or score is None:
                continue
            if not Path(best).is_file():
                log.warning(
                    "The best checkpoint of the resumed run, %s, is gone: its score is forgotten", best
                )
                state["best_model_score"] = None
                continue
            copy = Path(callback.dirpath) / Path(best).name
            if trainer.is_global_zero:
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(best, copy)
            state.update(best_model_path=str(copy), kth_best_model_path=str(copy), kth_value=score)
            state["best_k_models"] = {str(copy): score}
            log.info("Resumed with the best checkpoint so far: %s (%s %.2f)", copy, callback.monitor, score)
