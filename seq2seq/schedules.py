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
from seq2seq.run_clock import time_budget

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
        time_used: returns the share of the time budget used so far (None: no time budget).

    The decay runs from the budget share at which warmup ended (kept in :meth:`state_dict`, with the
    step count, so a resumed run continues the same curve) to 1.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        shape: str,
        warmup_steps: int,
        max_steps: int | None,
        time_used: Callable[[], float] | None,
        floor: float = 0.0,
    ) -> None:
        if shape not in BUDGET_SCHEDULES:
            raise UserError(f"module.scheduler.name must be one of {BUDGET_SCHEDULES}, got {shape!r}")
        if not 0.0 <= floor < 1.0:
            raise UserError(f"module.scheduler.floor must be in [0, 1), got {floor}")
        if max_steps is None and time_used is None:
            raise UserError(
                f"module.scheduler.name={shape} decays over the run's budget: set trainer.max_time or"
                " trainer.max_steps"
            )
        self.shape, self.floor = shape, floor
        self.warmup_steps = max(warmup_steps, 1)
        self.max_steps, self.time_used = max_steps, time_used
        self.warmup_end: float | None = None  # the budget share used when warmup ended
        super().__init__(optimizer)

    def budget_used(self) -> float:
        """The share of the budget used, in [0, 1]."""
        shares = [self.last_epoch / self.max_steps] if self.max_steps else []
        if self.time_used is not None:
            shares.append(self.time_used())
        return min(max(shares), 1.0)

    def factor(self) -> float:
        """The rate for the next optimizer step, as a fraction of the peak."""
        step = self.last_epoch + 1
        if step < self.warmup_steps:
            return step / self.warmup_steps
        used = self.budget_used()
        if self.warmup_end is None:
            self.warmup_end = used
        left = 1.0 - self.warmup_end
        done = min(max((used - self.warmup_end) / left, 0.0), 1.0) if left > 0 else 1.0
        remaining = 1.0 - done if self.shape == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))
        return self.floor + (1.0 - self.floor) * remaining

    def get_lr(self) -> list[float]:
        factor = self.factor()
        return [base * factor for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state without the budget reader (it reads the trainer, rebuilt on resume)."""
        return {key: value for key, value in super().state_dict().items() if key != "time_used"}


def time_budget_used(trainer: L.Trainer) -> Callable[[], float] | None:
    """A function returning the share of ``trainer.max_time`` used (None without a time budget).

    Lightning's Timer counts training time from the start of fit, validation included, plus the time of
    the run resumed from (its state is in checkpoints).
    """
    timer = time_budget(trainer)
    if timer is None:
        return None

    def used() -> float:
        elapsed = timer.time_elapsed()
        return elapsed / max(elapsed + timer.time_remaining(), 1e-9)

    return used


def build_scheduler(settings: dict[str, Any], optimizer: Optimizer, trainer: L.Trainer | None) -> LRScheduler:
    """The per-step scheduler that ``module.scheduler`` names (``plateau`` is the module's own); a
    budget-aware one reads its budget from ``trainer``."""
    name, warmup = settings["name"], int(settings.get("warmup_steps", 0))
    if name in STEP_SCHEDULES:
        return warmup_then(name, optimizer, warmup)
    max_steps = trainer.max_steps if trainer.max_steps > 0 else None
    time_used = time_budget_used(trainer)
    return BudgetDecay(optimizer, name, warmup, max_steps, time_used, float(settings.get("floor", 0.0)))
