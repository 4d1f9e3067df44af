"""Callbacks of a training run: FLOP counts and throughput, checkpoints (timed, on stopping, the best one
carried into a resumed run) and the validation that ends every run. What a user watches (progress lines,
the progress bar, validation lines) is :mod:`seq2seq.progress`'s."""

from __future__ import annotations

import logging
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.callbacks import ThroughputMonitor as LightningThroughputMonitor
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from seq2seq.checkpoints import save_resume_checkpoint
from seq2seq.data.collate import Batch
from seq2seq.flops import measured_peak_flops, training_flops
from seq2seq.private_apis import (
    count_untimed_batch,
    move_checkpoint_state,
    saved_best_checkpoint,
    set_available_flops,
    should_update_logs,
)

log = logging.getLogger(__name__)

# The dtype of the matrix products under each trainer.precision (fp32 otherwise).
COMPUTE_DTYPES = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16}


def best_checkpoint(trainer: L.Trainer) -> LightningModelCheckpoint | None:
    """The run's best checkpoint: the first ModelCheckpoint that monitors ``val_bleu`` (the test split
    is scored with its best model)."""
    return next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None) == "val_bleu"), None)


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

    Under DDP only a SIGTERM is agreed on: every process stops at the same batch's start
    (:func:`~seq2seq.private_apis.check_sigterm_on_logging_steps`) and they save together. An error or a
    Ctrl-C is one process's own, raised wherever it was while the others sit in collectives of their own
    (the step's all-reduce): the barrier of a save together would meet one of those and hang, or pair
    with it and mix unrelated data into the weights. So then no process calls a collective; the first
    one saves alone, from its own state, which is that of the last step every process finished (an
    optimizer step waits for every process's gradients, and an unfinished batch is left out). The
    others' failure reaches it as an error from its next collective, once they exit.
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
        together = trainer.world_size == 1 or isinstance(exception, SIGTERMException)
        if not (together or trainer.is_global_zero):
            return
        path = self.dirpath / "last.ckpt"
        try:
            save_resume_checkpoint(trainer, path, "in a batch", alone=not together)
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
            set_available_flops(
                self, measured_peak_flops("cpu", COMPUTE_DTYPES.get(str(trainer.precision), torch.float32))
            )
        self._flops_since_update: dict[Any, int] = {}

    @rank_zero_only
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        if self._timed(trainer, pl_module, batch):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, *args)

    @rank_zero_only
    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        if not trainer.sanity_checking and self._timed(trainer, pl_module, batch):
            super().on_validation_batch_end(trainer, pl_module, outputs, batch, *args)

    def _timed(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> bool:
        """Whether this batch goes to Lightning's hook (which counts it, reads the clock and logs): on
        logging steps, with the FLOPs since the last one; otherwise it is counted here, untimed."""
        stage = trainer.state.stage
        flops = getattr(pl_module, "flops_per_batch", None)
        if flops is not None:
            self._flops_since_update[stage] = self._flops_since_update.get(stage, 0) + flops
        if should_update_logs(trainer):
            if flops is not None:  # what the parent passes on as the FLOPs since its last update
                pl_module.flops_per_batch = self._flops_since_update.pop(stage)
            return True
        count_untimed_batch(self, stage, batch)
        return False


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
            if not state:
                continue
            dirpath, best, score = saved_best_checkpoint(state)
            if dirpath in (None, callback.dirpath):
                continue  # resumed in the same folder: Lightning restores it all
            if not callback.monitor or not best or score is None:
                move_checkpoint_state(state, callback.dirpath)
                continue
            # The first process's answer for all: a process on another node may not see the file (a
            # node's own disk), and processes whose callbacks differ pair their collectives wrongly.
            if not trainer.strategy.broadcast(Path(best).is_file(), src=0):
                log.warning(
                    "The best checkpoint of the resumed run, %s, is gone: its score is forgotten", best
                )
                move_checkpoint_state(state, callback.dirpath)
                continue
            copy = Path(callback.dirpath) / Path(best).name
            if trainer.is_global_zero:
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(best, copy)
            move_checkpoint_state(state, callback.dirpath, str(copy), score)
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
