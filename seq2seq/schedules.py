"""Learning-rate schedules stepped once per optimizer step: warmup, then a decay that either ignores the
run's length (``inverse_sqrt``, ``constant``) or ends with its budget (``linear``, ``cosine``).

A budget-aware schedule reads how much of the budget is used: the share of ``trainer.max_steps`` taken
and the share of ``trainer.max_time`` elapsed (Lightning's Timer, whose elapsed time is saved in
checkpoints), whichever is larger, so a run with both ends its decay with the limit that stops it. After
warmup the rate falls from its peak to ``floor`` x peak over the rest of the budget (Li, Yumer and
Ramanan, Budgeted Training, ICLR 2020: a linear decay to zero at the end of the budget).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from seq2seq.errors import UserError
from seq2seq.run_clock import agreed_clock, time_budget

STEP_SCHEDULES = ("inverse_sqrt", "constant")
BUDGET_SCHEDULES = ("linear", "cosine")


def warmup_then(name: str, optimizer: Optimizer, warmup_steps: int) -> LambdaLR:
    """``inverse_sqrt`` (linear warmup over ``warmup_steps``, then the inverse square root of the step)
    or ``constant`` (warmup, then flat)."""
    warmup = max(warmup_steps, 1)
    decay = name == "inverse_sqrt"

    def factor(step: int) -> float:
        step += 1
        if step < warmup:
            return step / warmup
        return math.sqrt(warmup / step) if decay else 1.0

    return LambdaLR(optimizer, factor)


class BudgetDecay(LRScheduler):
    """Linear warmup over ``warmup_steps``, then a ``linear`` or ``cosine`` decay from the peak rate to
    ``floor`` x peak at the end of the budget.

    Args:
        max_steps: the step budget (None: none); the step share is optimizer steps taken / max_steps.
        max_seconds: the time budget (None: none), whose share is ``elapsed()`` / max_seconds.
        elapsed: returns the training time used so far, in seconds (alike on every process).

    The decay runs from the budget share at which warmup ended (kept in :meth:`state_dict`, with the
    step count, so a resumed run continues the same curve) to 1. A run resumed with another budget
    (``trainer.max_steps`` or ``trainer.max_time``) follows the budget given now: its decay goes on from
    the rate it had reached, at the budget share the resume point has in the new budget, down to the
    floor at the new end (the old budget, restored, left the rate at the floor for a longer run, or made
    it jump up for a longer time budget).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        shape: str,
        warmup_steps: int,
        max_steps: int | None,
        max_seconds: float | None = None,
        elapsed: Callable[[], float] | None = None,
        floor: float = 0.0,
    ) -> None:
        if shape not in BUDGET_SCHEDULES:
            raise UserError(f"module.scheduler.name must be one of {BUDGET_SCHEDULES}, got {shape!r}")
        if not 0.0 <= floor < 1.0:
            raise UserError(f"module.scheduler.floor must be in [0, 1), got {floor}")
        if max_steps is None and max_seconds is None:
            raise UserError(
                f"module.scheduler.name={shape} decays over the run's budget: set trainer.max_time or"
                " trainer.max_steps"
            )
        if (max_seconds is None) != (elapsed is None):
            raise ValueError("a time budget needs both max_seconds and elapsed")
        self.shape, self.floor = shape, floor
        self.warmup_steps = max(warmup_steps, 1)
        self.max_steps, self.max_seconds, self.elapsed = max_steps, max_seconds, elapsed
        self.decay_start: float | None = None  # the budget share used where the decay (re)started
        self.decay_from = 1.0  # the factor it started from: the peak, or the rate reached at a resume
        super().__init__(optimizer)

    def budget_used(self) -> float:
        """The share of the budget used, in [0, 1]."""
        shares = [self.last_epoch / self.max_steps] if self.max_steps else []
        if self.max_seconds is not None:
            shares.append(self.elapsed() / max(self.max_seconds, 1e-9))
        return min(max(shares), 1.0)

    def factor(self) -> float:
        """The rate for the next optimizer step, as a fraction of the peak."""
        step = self.last_epoch + 1
        if step < self.warmup_steps:
            return step / self.warmup_steps
        used = self.budget_used()
        if self.decay_start is None:
            self.decay_start = used
        left = 1.0 - self.decay_start
        done = min(max((used - self.decay_start) / left, 0.0), 1.0) if left > 0 else 1.0
        remaining = 1.0 - done if self.shape == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))
        return self.floor + (self.decay_from - self.floor) * remaining

    def get_lr(self) -> list[float]:
        factor = self.factor()
        return [base * factor for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state without the clock (it reads the trainer, rebuilt on resume)."""
        return {key: value for key, value in super().state_dict().items() if key != "elapsed"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the curve; where the budget differs from the saved one, keep today's and go on from the
        rate reached (the next budget share read anchors the rest of the decay)."""
        budget = (self.max_steps, self.max_seconds)
        state = dict(state_dict)
        if "warmup_end" in state:  # saved before the decay could restart (the same curve)
            state["decay_start"] = state.pop("warmup_end")
        saved = (state.get("max_steps"), state.get("max_seconds", self.max_seconds))
        super().load_state_dict(state)
        self.max_steps, self.max_seconds = budget
        if saved != budget and self.decay_start is not None:
            self.decay_start = None
            self.decay_from = self._last_lr[0] / self.base_lrs[0] if self.base_lrs[0] else self.decay_from


def time_budget_used(trainer: L.Trainer) -> tuple[float, Callable[[], float]] | None:
    """The time budget in seconds and a function returning the training time used so far, alike on every
    process (:class:`~seq2seq.run_clock.AgreedClock`); None without ``trainer.max_time``.

    Lightning's Timer counts training time from the start of fit, validation included, plus the time of
    the run resumed from (its state is in checkpoints).
    """
    timer = time_budget(trainer)
    if timer is None:
        return None
    clock = agreed_clock(trainer)
    budget = timer.time_elapsed() + timer.time_remaining()
    return budget, (lambda: clock.elapsed(trainer)) if clock is not None else timer.time_elapsed


def build_scheduler(settings: dict[str, Any], optimizer: Optimizer, trainer: L.Trainer | None) -> LRScheduler:
    """The per-step scheduler that ``module.scheduler`` names (``plateau`` is the module's own); a
    budget-aware one reads its budget from ``trainer``."""
    name, warmup = settings["name"], int(settings.get("warmup_steps", 0))
    if name in STEP_SCHEDULES:
        return warmup_then(name, optimizer, warmup)
    max_steps = trainer.max_steps if trainer.max_steps > 0 else None
    max_seconds, elapsed = time_budget_used(trainer) or (None, None)
    floor = float(settings.get("floor", 0.0))
    return BudgetDecay(optimizer, name, warmup, max_steps, max_seconds, elapsed, floor)
