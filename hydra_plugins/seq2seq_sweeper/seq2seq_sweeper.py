"""Hydra's entry to the sweeper of seq2seq.sweeper: ``hydra/sweeper=seq2seq`` (conf/hparams_search/*.yaml).

Hydra imports every module under ``hydra_plugins`` at start, for any command: this one imports neither
Optuna nor torch (seq2seq.sweeper imports Optuna only when a sweep starts).
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class Seq2SeqSweeperConf:
    """The sweeper's options; docs/sweeps.md says what each does."""

    _target_: str = "hydra_plugins.seq2seq_sweeper.seq2seq_sweeper.Seq2SeqSweeper"
    _recursive_: bool = False  # the sampler and pruner are built where they are used, with Optuna loaded
    study_name: str = "sweep"
    # null: an Optuna journal file in the sweep folder (optuna.journal); a file path: a journal file
    # there; or a database URL (postgresql://..., mysql://..., sqlite:///...)
    storage: str | None = None
    direction: str = "maximize"  # train.py returns the best validation BLEU
    n_trials: int = 10  # the study's total: complete, pruned and running trials (failed ones are retried)
    max_failed_trials: int | None = None  # stop asking once the study has this many failed (null: n_trials)
    workers: int = 1  # processes (or SLURM jobs, with a submitit launcher), each running trials in turn
    split_cpus: bool = True  # local workers: each its own share of the CPU cores
    # local workers whose trials train on GPUs (trainer.accelerator=gpu): each its own trainer.devices GPUs
    split_gpus: bool = True
    retry_killed: int = 0  # a killed or stopped trial is queued again (and resumes), this many times
    heartbeat_interval: int | None = None  # database storages: a trial silent for 2 intervals is failed
    # Trials that enter the study first, once: values for some swept keys, the others at the config's
    # values; [{}] is the composed config itself (the default recipe, unless overridden).
    fixed_points: list[Any] = field(default_factory=lambda: [{}])
    sampler: Any = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler"})
    pruner: Any = None  # e.g. {_target_: optuna.pruners.MedianPruner}; null: no pruning
    # what a validation reports as its step: steps (optimizer steps) | seconds (training time, for
    # trainer.max_time budgets: the pruner's resources, e.g. Hyperband's min_resource, are then seconds)
    prune_on: str = "steps"
    plots: bool = True  # optimization history, intermediate values, importances: HTML (plotly) and PNG
    # key: choice(a, b) | range(1, 4) | interval(0.0, 0.3) | tag(log, interval(1e-4, 1e-2))
    params: dict[str, Any] = field(default_factory=dict)


ConfigStore.instance().store(
    group="hydra/sweeper", name="seq2seq", node=Seq2SeqSweeperConf, provider="seq2seq"
)


class Seq2SeqSweeper(Sweeper):
    """Asynchronous workers on one Optuna study; the options are read from ``hydra.sweeper`` as
    written (not instantiated: each worker builds its own sampler, each trial the pruner)."""

    def __init__(self, **options: Any) -> None:
        del options  # instantiated by Hydra; setup() reads the same options from the config

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.task_function = task_function
        self.config = config

    def sweep(self, arguments: list[str]) -> None:
        from seq2seq.sweeper import run_sweep

        run_sweep(self.hydra_context, self.task_function, self.config, arguments)
