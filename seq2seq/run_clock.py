"""The run's one clock: training time of the whole run, across resumes, and what is left of its budget.

Lightning's Timer is that clock: it stops training at ``trainer.max_time``, is saved in checkpoints and
carries the time trained before a resume. A run without ``max_time`` gets one with no duration from
:func:`clock_callbacks`, so that every run has it: the progress lines, the budget-aware learning-rate
schedules, pruning by seconds and the resume check all read it here.

Under DDP each process has its own Timer, started when that process started training; what every
process must apply alike (the learning rate of a time budget) reads :class:`AgreedClock` instead: the
first process's Timer, agreed on logging steps.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer

from seq2seq.private_apis import should_update_logs


def clock(seconds: float) -> str:
    """``H:MM:SS``."""
    return str(timedelta(seconds=round(seconds)))


def clock_callbacks(max_time: str | timedelta | dict | None) -> list[L.Callback]:
    """The callbacks of the run's clock: :class:`AgreedClock`, and a Timer with no duration, which only
    counts, where ``trainer.max_time`` is not set (where it is, Lightning adds one with that duration)."""
    return [AgreedClock(), *([Timer(duration=None)] if max_time is None else [])]


def run_timer(trainer: L.Trainer) -> Timer | None:
    """The run's Timer (None in a trainer built without :func:`clock_callbacks` and ``max_time``)."""
    return next((c for c in trainer.callbacks if isinstance(c, Timer)), None)


def time_budget(trainer: L.Trainer) -> Timer | None:
    """The run's Timer if the run has a time budget (``trainer.max_time``), else None."""
    timer = run_timer(trainer)
    return timer if timer is not None and timer.time_remaining() is not None else None


def elapsed_seconds(trainer: L.Trainer) -> float:
    """Seconds of training in the whole run so far (validation included, as Lightning's Timer counts)."""
    timer = run_timer(trainer)
    return 0.0 if timer is None else timer.time_elapsed()


def budget_seconds(max_time: str | timedelta) -> float:
    """``trainer.max_time`` ("DD:HH:MM:SS" or a timedelta) in seconds, as Lightning's Timer reads it."""
    return Timer(duration=max_time).time_remaining()


def checkpoint_elapsed_seconds(checkpoint: dict[str, Any]) -> float | None:
    """The training time a checkpoint's run had used; None if it has no Timer state."""
    state = checkpoint.get("callbacks", {}).get(Timer.__qualname__)  # Timer's state_key
    if state is None:
        return None
    timer = Timer(duration=None)
    timer.load_state_dict(state)
    return timer.time_elapsed()


class AgreedClock(L.Callback):
    """The run's elapsed training time as every process reads it alike: the first process's Timer.

    Each process's Timer starts when that process starts training, so under DDP they differ, and a
    learning rate computed from them would differ per process (the replicas drift apart: DDP averages
    gradients, never weights). Where the run has a time budget, the processes agree on the first one's
    elapsed time at the start of training and on every logging step (``trainer.log_every_n_steps``):
    one broadcast and one host read of a number where the logging step reads the loss anyway, none on
    other steps (a broadcast every step would make the host wait for the GPU each step). Between two
    agreements every process extrapolates alike, from the agreed time per step of the last interval.
    A single process, or a run without a time budget, reads its Timer directly.
    """

    def __init__(self) -> None:
        self.agreed: list[tuple[int, float]] = []  # (global step, elapsed seconds): the last two agreed

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.agreed = []
        self.agree(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if should_update_logs(trainer):  # alike on every process, as the SIGTERM agreement relies on
            self.agree(trainer)

    @staticmethod
    def shared(trainer: L.Trainer) -> bool:
        """Whether the processes must agree: several of them, and a time budget to read."""
        return (
            trainer.world_size > 1 and time_budget(trainer) is not None and torch.distributed.is_initialized()
        )

    def agree(self, trainer: L.Trainer) -> None:
        if not self.shared(trainer):
            return
        elapsed = torch.tensor(
            [run_timer(trainer).time_elapsed()], dtype=torch.float64, device=trainer.strategy.root_device
        )
        torch.distributed.broadcast(elapsed, src=0)
        self.agreed = [*self.agreed[-1:], (trainer.global_step, elapsed.item())]

    def elapsed(self, trainer: L.Trainer) -> float:
        """Seconds of training in the whole run so far, alike on every process."""
        if not self.shared(trainer) or not self.agreed:
            return elapsed_seconds(trainer)
        step, seconds = self.agreed[-1]
        if len(self.agreed) == 1:
            return seconds
        first_step, first_seconds = self.agreed[0]
        per_step = (seconds - first_seconds) / max(step - first_step, 1)
        return seconds + (trainer.global_step - step) * per_step


def agreed_clock(trainer: L.Trainer) -> AgreedClock | None:
    """The run's :class:`AgreedClock` (None in a trainer built without :func:`clock_callbacks`)."""
    return next((c for c in trainer.callbacks if isinstance(c, AgreedClock)), None)
