"""Pruning of sweep trials: each validation's BLEU goes to the Optuna trial the sweeper runs
(seq2seq.sweeper; seq2seq.trial is their protocol), and training stops when the study's pruner says so."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Timer

from seq2seq.errors import UserError
from seq2seq.private_apis import trial_id
from seq2seq.run_clock import time_budget
from seq2seq.trial import NO_TIME_BUDGET, PRUNED_AT, TRIAL_ENV, StudySpec

log = logging.getLogger(__name__)


class TrialPruning(L.Callback):
    """Reports ``monitor`` after each validation to the trial, as ``trial.report(value, step)``, and stops
    training at once when ``trial.should_prune()``: the best checkpoint so far stays, and the run's
    result.json says ``pruned``. Under DDP only rank 0 talks to the storage; it broadcasts the decision,
    so that all ranks stop together.

    ``step`` is where the trial is in its budget (``hydra.sweeper.prune_on``): optimizer steps, or whole
    seconds of training time for a ``trainer.max_time`` budget, so that the pruner (Hyperband's rungs)
    compares trials at equal time, not at equal steps that some trials take longer to make."""

    def __init__(self, trial: dict[str, Any], monitor: str = "val_bleu") -> None:
        self.spec = trial  # seq2seq.trial.TRIAL_ENV
        self.monitor = monitor
        self.trial: Any = None
        self.timer: Timer | None = None  # prune_on=seconds: Lightning's clock of the time budget
        self.validations: dict[int, float] = {}  # step: value, on rank 0
        self.pruned_at: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.spec.get("prune_on", "steps") == "seconds":
            self.timer = time_budget(trainer)
            if self.timer is None:
                raise UserError(NO_TIME_BUDGET)
        if trainer.is_global_zero and self.trial is None:
            import optuna
            from hydra.utils import instantiate

            spec = StudySpec(storage=self.spec["storage"], name=self.spec["study"], direction="maximize")
            pruner = instantiate(self.spec["pruner"]) if self.spec["pruner"] else optuna.pruners.NopPruner()
            study = optuna.load_study(study_name=spec.name, storage=spec.open_storage(), pruner=pruner)
            (this,) = [t for t in study.get_trials(deepcopy=False) if t.number == self.spec["trial"]]
            self.trial = optuna.Trial(study, trial_id(this))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        prune = False
        if trainer.is_global_zero:
            value, step = float(trainer.callback_metrics[self.monitor]), trainer.global_step
            self.validations[step] = value
            self.trial.report(value, self.position(trainer))
            # A trial at the end of its budget (max_steps, or max_time: Lightning validates where it stops
            # training) is complete, whatever its last validation says.
            ending = trainer.should_stop or 0 < trainer.max_steps <= step
            prune = not ending and self.trial.should_prune()
            if prune:
                self.trial.set_user_attr(PRUNED_AT, step)
        prune = trainer.strategy.broadcast(prune, src=0)
        if prune:
            self.pruned_at = trainer.global_step
            trainer.should_stop = True
            log.info("Trial %d pruned at step %d (%s by validation: %s)", self.spec["trial"], self.pruned_at,
                     self.monitor, self.history())  # fmt: skip

    def position(self, trainer: L.Trainer) -> int:
        """Where the trial is in its budget, as the pruner counts: optimizer steps, or whole seconds of
        training time (Lightning's Timer: validation included, and the time of the run resumed from)."""
        return trainer.global_step if self.timer is None else int(self.timer.time_elapsed())

    def history(self) -> str:
        return " ".join(f"{step}:{value:.2f}" for step, value in self.validations.items())

    def record(self) -> dict[str, Any]:
        """For the run's result.json: each validation, and where a pruned trial stopped."""
        return {"validations": self.history(), "pruned_at_step": self.pruned_at}


def trial_pruning() -> TrialPruning | None:
    """The pruning callback when this training job is a trial of seq2seq.sweeper, else None."""
    spec = os.environ.get(TRIAL_ENV)
    return TrialPruning(json.loads(spec)) if spec else None
