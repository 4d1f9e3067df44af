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


class RecordValidationSteps(L.Callback):
    """Appends the step of each validation while training to ``path``.rankN, one line each."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            with open(f"{self.path}.rank{trainer.global_rank}", "a", encoding="utf-8") as f:
                f.write(f"{trainer.global_step}\n")


class SlowTrainLoader(L.Callback):
    """Process ``rank`` takes ``seconds`` longer to make its training loader (as a rank that sorts a large
    split more slowly, or reads it from a slower disk): Lightning asks for the loader after the processes
    meet to start training and before it starts the clock of a validation interval in seconds."""

    def __init__(self, rank: int, seconds: float) -> None:
        self.rank = rank
        self.seconds = seconds

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        datamodule = trainer.datamodule
        if trainer.global_rank != self.rank or datamodule is None:
            return
        make = datamodule.train_dataloader

        def slowly() -> Any:
            time.sleep(self.seconds)
            return make()

        datamodule.train_dataloader = slowly


class BestCheckpointElsewhere(L.Callback):
    """On process ``rank``, the resumed checkpoint's best checkpoint is not there (as one kept on another
    node's own disk): its saved path is changed to one that does not exist, before the run's own
    callbacks read it."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict) -> None:
        if trainer.global_rank != self.rank:
            return
        for state in checkpoint.get("callbacks", {}).values():
            if isinstance(state, dict) and state.get("best_model_path"):
                state["best_model_path"] += ".on-another-node"


class RecordBestCheckpoint(L.Callback):
    """Writes, per process, what its monitored checkpoint callbacks hold as best when training ends:
    ``path``.rankN, one line per callback (its monitor, best path and score)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        lines = [
            f"{c.monitor} {c.best_model_path} {float(c.best_model_score):.6f}"
            for c in trainer.checkpoint_callbacks
            if c.monitor and c.best_model_score is not None
        ]
        with open(f"{self.path}.rank{trainer.global_rank}", "w", encoding="utf-8") as f:
            f.write("".join(f"{line}\n" for line in lines))
