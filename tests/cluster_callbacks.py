"""Callbacks that the cluster tests add to real training runs (``+callbacks.NAME._target_=...``)."""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class SleepAtTrainStart(L.Callback):
    """Sleeps ``seconds`` on process ``rank`` when training starts, before the run's Timer starts (the
    config's callbacks come before it): that process's clock then reads less elapsed time than the others'
    for the whole run."""

    def __init__(self, rank: int, seconds: float) -> None:
        self.rank = rank
        self.seconds = seconds

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.global_rank == self.rank:
            time.sleep(self.seconds)
