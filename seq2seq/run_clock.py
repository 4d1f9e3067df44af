"""The run's one clock: training time of the whole run, across resumes, and what is left of its budget.

Lightning's Timer is that clock: it stops training at ``trainer.max_time``, is saved in checkpoints and
carries the time trained before a resume. A run without ``max_time`` gets one with no duration from
:func:`clock_callbacks`, so that every run has it: the progress lines, the budget-aware learning-rate
schedules, pruning by seconds and the resume check all read it here.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import Timer

if TYPE_CHECKING:
    import lightning as L


def clock(seconds: float) -> str:
    """``H:MM:SS``."""
    return str(timedelta(seconds=round(seconds)))


def clock_callbacks(max_time: str | timedelta | dict | None) -> list[Timer]:
    """The Timer to add to a run's callbacks: none where ``trainer.max_time`` is set (Lightning adds one
    with that duration), else one with no duration, which only counts."""
    return [Timer(duration=None)] if max_time is None else []


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
