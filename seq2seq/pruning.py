"""Pruning of sweep trials: each validation's BLEU goes to the Optuna trial the sweeper runs
(seq2seq.sweeper), and training stops when the study's pruner says so."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import lightning as L

from seq2seq.sweeper import PRUNED_AT, TRIAL_ENV, StudySpec

log = logging.getLogger(__name__)


class TrialPruning(L.Callback):
    """Reports ``monitor`` after each validation to the trial, as ``trial.report(value, step)``, and stops
    training at once when ``trial.should_prune()``: the best checkpoint so far stays, and the run's
    result.json says ``pruned``. Under DDP only rank 0 talks to the storage; it broadcasts the decision,
    so that all ranks stop together."""

    def __init__(self, trial: dict[str, Any], monitor: str = "val_bleu") -> None:
        self.spec = trial  # seq2seq.sweeper.TRIAL_ENV
        self.monitor = monitor
        self.trial: Any = None
        self.validations: dict[int, float] = {}  # step: value, on rank 0
        self.pruned_at: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero and self.trial is None:
            import optuna
            from hydra.utils import instantiate

            spec = StudySpec(storage=self.spec["storage"], name=self.spec["study"], direction="maximize")
            pruner = instantiate(self.spec["pruner"]) if self.spec["pruner"] else optuna.pruners.NopPruner()
            study = optuna.load_study(study_name=spec.name, storage=spec.open_storage(), pruner=pruner)
            trial_id = next(
                t._trial_id for t in study.get_trials(deepcopy=False) if t.number == self.spec["trial"]
            )
            self.trial = optuna.Trial(study, trial_id)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        prune = False
        if trainer.is_global_zero:
            value, step = float(trainer.callback_metrics[self.monitor]), trainer.global_step
            self.validations[step] = value
            self.trial.report(value, step)
            # A trial at the end of its step budget is complete, whatever its last validation says.
            prune = not 0 < trainer.max_steps <= step and self.trial.should_prune()
            if prune:
                self.trial.set_user_attr(PRUNED_AT, step)
        prune = trainer.strategy.broadcast(prune, src=0)
        if prune:
            self.pruned_at = trainer.global_step
            trainer.should_stop = True
            log.info("Trial %d pruned at step %d (%s by validation: %s)", self.spec["trial"], self.pruned_at,
                     self.monitor, self.history())  # fmt: skip

    def history(self) -> str:
        return " ".join(f"{step}:{value:.2f}" for step, value in self.validations.items())

    def record(self) -> dict[str, Any]:
        """For the run's result.json: each validation, and where a pruned trial stopped."""
        return {"validations": self.history(), "pruned_at_step": self.pruned_at}


def trial_pruning() -> TrialPruning | None:
    """The pruning callback when this training job is a trial of seq2seq.sweeper, else None."""
    spec = os.environ.get(TRIAL_ENV)
    return TrialPruning(json.loads(spec)) if spec else None
