"""Callbacks of a training run: progress and validation results for log files, FLOP counts and
throughput, a checkpoint on stopping, and the best checkpoint carried into a resumed run."""

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
import torch
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.callbacks import ThroughputMonitor as LightningThroughputMonitor
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from seq2seq.cli import log_to_files
from seq2seq.data.collate import Batch, target_tokens
from seq2seq.flops import measured_peak_flops, training_flops
from seq2seq.private_apis import forget_unfinished_batch, should_update_logs

log = logging.getLogger(__name__)

# The dtype of the matrix products under each trainer.precision (fp32 otherwise).
COMPUTE_DTYPES = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16}


def clock(seconds: float) -> str:
    """``H:MM:SS``."""
    return str(timedelta(seconds=round(seconds)))


class ProgressLog(L.Callback):
    """Progress that reaches a log file and a terminal alike.

    When stdout is not a terminal (``> log``, nohup, a batch job) or the progress bar is off, a plain line
    about every ``every_seconds`` of training, on the console and in train.log: step, epoch, training
    loss, target tokens/s, time elapsed and time left before the first of ``trainer.max_time``,
    ``max_steps`` and ``max_epochs`` stops the run. In a terminal, the progress bar shows the time left
    instead (``left``), since its own estimate covers only the current epoch, and the training loss.
    The loss is read on logging steps (``trainer.log_every_n_steps``) only: reading it from the device
    is a wait.

    Elapsed counts the whole run, across resumes (the checkpoint keeps it), as ``trainer.max_time`` does.
    """

    def __init__(self, every_seconds: float = 30.0) -> None:
        self.every_seconds = every_seconds
        self.total_tokens = 0  # also when fit trains nothing (resumed from the end of training)
        self.earlier_seconds = 0.0  # trained before this process: by the runs this one resumes
        self.started: float | None = None

    def state_dict(self) -> dict[str, float]:
        return {"elapsed": self.elapsed()}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.earlier_seconds = state_dict["elapsed"]

    def elapsed(self) -> float:
        """Seconds of training in the whole run so far."""
        return self.earlier_seconds + (0.0 if self.started is None else time.perf_counter() - self.started)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.plain = trainer.progress_bar_callback is None or not sys.stdout.isatty()
        self.started = self.last_time = time.perf_counter()
        self.first_step = self.last_step = trainer.global_step
        self.tokens = 0
        self.total_tokens = 0  # this process's target tokens, for the run's mean rate (sweep summaries)
        self.loss: float | None = None  # as of the latest logging step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.earlier_seconds, self.started = self.elapsed(), None  # the clock stops with training, as Timer's

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Batch, batch_idx: int
    ) -> None:
        tokens = target_tokens(batch)
        self.tokens += tokens
        self.total_tokens += tokens
        now = time.perf_counter()
        if should_update_logs(trainer) and "train_loss" in trainer.callback_metrics:
            self.loss = float(trainer.callback_metrics["train_loss"])
        if not self.plain:
            # The dict the bar displays (Lightning's ProgressBar.get_metrics).
            if self.loss is not None:
                trainer.progress_bar_metrics["train_loss"] = round(self.loss, 3)
            left = self.time_left(trainer, now)
            if left is not None:
                trainer.progress_bar_metrics["left"] = clock(left[0])
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
            f"{rate:,.0f}", per_process, clock(self.elapsed()),
            "unknown" if left is None else f"{clock(left[0])} ({left[1]})",
        )  # fmt: skip
        self.last_time, self.tokens = now, 0

    def time_left(self, trainer: L.Trainer, now: float) -> tuple[float, str] | None:
        """Seconds left before the run stops (0 at the least), and which limit stops it; None before a rate
        is known. Like elapsed, max_time counts the whole run (Lightning's Timer keeps it in checkpoints)."""
        estimates = []
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        if timer is not None and timer.time_remaining() is not None:
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
        checkpoint = self.best_checkpoint(trainer)
        self.pending = (trainer.global_step, metrics, checkpoint.best_model_path if checkpoint else None)

    @staticmethod
    def best_checkpoint(trainer: L.Trainer) -> Any:
        return next(
            (c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None) == "val_bleu"), None
        )

    def flush(self, trainer: L.Trainer) -> None:
        if self.pending is None:
            return
        (step, metrics, best_before), self.pending = self.pending, None
        checkpoint = self.best_checkpoint(trainer)
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
        forget_unfinished_batch(trainer)
        try:
            trainer.save_checkpoint(path)
        except Exception as error:  # the original exception must still reach the user
            log.error("%s %s; saving %s failed: %s", reason, where, path, error)
            return
        if trainer.is_global_zero:
            log.warning("%s %s: saved %s; resume with ckpt_path=%s", reason, where, path, path)


class ThroughputMonitor(LightningThroughputMonitor):
    """Lightning's callback, timing only the batches whose logs are written, with MFU on any device.

    Lightning synchronises CUDA after every batch so that its clock reads the GPU's progress, which
    stalls the host's queue each step. Here every batch is counted, but the clock is read (after that
    synchronisation) only on logging steps (``trainer.log_every_n_steps``), so each rate spans whole
    logging intervals: ``window_size`` of them. The FLOPs of the batches in between are summed, as
    ``Throughput.update`` expects the FLOPs since its last call. Where Lightning knows no peak for the
    device (a CPU), MFU divides by a measured one (:func:`~seq2seq.flops.measured_peak_flops`).
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.available_flops is None and trainer.strategy.root_device.type == "cpu":
            self.available_flops = measured_peak_flops(
                "cpu", COMPUTE_DTYPES.get(str(trainer.precision), torch.float32)
            )
            for throughput in self._throughputs.values():
                throughput.available_flops = self.available_flops
        self._flops_since_update: dict[Any, int] = {}

    # Private (Lightning 2.6.6, see seq2seq/private_apis.py): ``_update`` is where the parent counts
    # a batch and reads its clock, and its counters are ``_lengths``/``_samples``/``_batches``; no public
    # hook counts a batch without the clock. ``_throughputs`` holds the per-stage Throughput objects, which
    # copy the peak when set up. tests/test_private_apis.py checks they exist.
    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, iter_num: int) -> None:
        stage = trainer.state.stage
        flops = getattr(pl_module, "flops_per_batch", None)
        if flops is not None:
            self._flops_since_update[stage] = self._flops_since_update.get(stage, 0) + flops
        if should_update_logs(trainer):
            if flops is not None:  # what the parent passes on as the FLOPs since its last update
                pl_module.flops_per_batch = self._flops_since_update.pop(stage)
            super()._update(trainer, pl_module, batch, iter_num)
            return
        if self.length_fn is not None:
            self._lengths[stage] += self.length_fn(batch)
        self._samples[stage] += self.batch_size_fn(batch)
        self._batches[stage] += 1


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's, with its clock (``train_time_interval``) read on logging steps only.

    Lightning reads the clock after every training batch and, under DDP, broadcasts the first process's
    decision (a pickled bool) to all: a collective and a wait each step. Here a time-based checkpoint is
    saved at the first logging step (``trainer.log_every_n_steps``) after the interval has passed.
    """

    def __init__(self, *, train_time_interval: timedelta | None = None, **kwargs: Any) -> None:
        super().__init__(train_time_interval=train_time_interval, **kwargs)
        self.timed = train_time_interval is not None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # With train_time_interval (which excludes every_n_train_steps) the clock is all a batch's end
        # checks; validation-end and training-end saves are Lightning's other hooks, untouched.
        if self.timed and not should_update_logs(trainer):
            return
        super().on_train_batch_end(trainer, pl_module, *args)


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


class FinalValidation(L.Callback):
    """Training ends with a validation, so that the run's folder always has a best checkpoint; and the
    run's validations are counted (``count``, across resumes: the checkpoint keeps it) and timed
    (``seconds``, in this process).

    Lightning validates every ``val_check_interval`` batches and where ``max_time`` stops training, but
    not where ``max_steps`` or ``max_epochs`` do: a short run would end with no validation at all. Setting
    ``should_stop`` on the last step (as early stopping does) makes Lightning validate there, unless
    that step validates anyway.

    With ``every_epoch`` (``evaluate.validate_every_epoch``), an interval in batches longer than an epoch
    becomes an epoch's batches: a small corpus validates at the end of every epoch (Lightning counts the
    interval across epochs, ``check_val_every_n_epoch`` being null), so that a short run on it keeps its
    best epoch and validates often enough for ``decoding.alpha=auto`` to be tuned. An interval in time,
    or of at most an epoch, stays as it is.
    """

    def __init__(self, every_epoch: bool = False) -> None:
        self.every_epoch = every_epoch
        self.count = 0
        self.seconds = 0.0
        self._started = 0.0

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.count = state_dict["count"]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        interval = getattr(trainer, "val_check_interval", None)  # unset for an interval in time
        by_batches = isinstance(interval, int) and trainer.check_val_every_n_epoch is None
        if not (self.every_epoch and by_batches):
            return
        epoch = len(trainer.datamodule.train_dataloader())  # this process's batches: the same every epoch
        if epoch < interval:
            trainer.val_check_interval = epoch  # read by Lightning's fit loop when it sets up the data
            log.info(
                "Validation every %d batches, at the end of each epoch: trainer.val_check_interval=%d is"
                " longer than an epoch (evaluate.validate_every_epoch=true)", epoch, interval,
            )  # fmt: skip

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Batch, batch_idx: int
    ) -> None:
        last_step = 0 < trainer.max_steps <= trainer.global_step
        last_epoch = trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1
        if last_step or (last_epoch and batch_idx + 1 >= trainer.num_training_batches):
            trainer.should_stop = True

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.count += 1
            self.seconds += time.perf_counter() - self._started
