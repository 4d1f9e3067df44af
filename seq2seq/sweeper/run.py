"""One sweep from start to end: check the options, open the study and enqueue its fixed points, run the
workers on the chosen back-end, and report the study however the sweep ends."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from seq2seq.errors import UserError
from seq2seq.sweep import swept_keys, write_summary
from seq2seq.sweeper.backends import (
    cpu_shares,
    gpu_shares,
    gpus_per_worker,
    run_jobs,
    run_local,
    submitit_executor,
)
from seq2seq.sweeper.plots import report
from seq2seq.sweeper.space import enqueue_fixed_points, search_space
from seq2seq.sweeper.storage import fail_orphaned_trials, study_lock
from seq2seq.sweeper.workers import Worker
from seq2seq.trial import NO_TIME_BUDGET, StudySpec, require_optuna

log = logging.getLogger(__name__)


def run_sweep(
    hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig, arguments: list[str]
) -> None:
    require_optuna()
    sweeper = config.hydra.sweeper
    sweep_dir = Path(config.hydra.sweep.dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, sweep_dir / "multirun.yaml")
    space, fixed = search_space(sweeper.params or {}, arguments)
    if not space:
        raise UserError("hydra.sweeper.params: nothing to search (give key: choice(...), interval(...), ...)")
    if sweeper.prune_on not in ("steps", "seconds"):
        raise UserError(f"hydra.sweeper.prune_on must be steps or seconds, got {sweeper.prune_on!r}")
    timed = config.trainer.get("max_time") or "trainer.max_time" in space
    if sweeper.prune_on == "seconds" and not timed:
        raise UserError(NO_TIME_BUDGET)
    if sweeper.workers < 1 or sweeper.n_trials < 0:
        raise UserError("hydra.sweeper.workers must be at least 1 and hydra.sweeper.n_trials not negative")
    executor = submitit_executor(config)
    local = executor is None
    # Local workers on GPUs: each its own (a submitit job gets its GPUs from the scheduler)
    gpus = (
        gpu_shares(sweeper.workers, gpus_per_worker(config.trainer)) if local and sweeper.split_gpus else None
    )
    spec = StudySpec.of(sweeper, sweep_dir)
    study = spec.load()
    # Under the lock: two commands that start together on one study must not both see it new (both
    # keeping the sampler's seed, both enqueueing the fixed points).
    with study_lock(sweep_dir):
        resumed = bool(study.trials)
        fail_orphaned_trials(study, spec, sweep_dir)
        enqueue_fixed_points(
            study, OmegaConf.to_container(sweeper.fixed_points) if sweeper.fixed_points else [], space, config
        )
    log.info(
        "Study %s in %s: %d trials so far; %d workers until %d trials are complete, pruned or running",
        spec.name,
        spec.storage,
        len(study.trials),
        sweeper.workers,
        sweeper.n_trials,
    )
    shares = cpu_shares(sweeper.workers) if local and sweeper.split_cpus else None
    run_id = uuid.uuid4().hex[:8]
    workers = [
        Worker(
            index=i,
            token=f"{run_id}-{i}",
            spec=spec,
            sweeper=sweeper,
            space=space,
            fixed=fixed,
            hydra_context=hydra_context,
            task_function=task_function,
            config=config,
            cpus=shares[i] if shares else None,
            gpus=gpus[i] if gpus else None,
            resumed=resumed,
            singletons=Singleton.get_state() if executor is not None else None,
        )
        for i in range(sweeper.workers)
    ]

    def on_dead(tokens: set[str], stopped: bool) -> None:
        with study_lock(sweep_dir):
            fail_orphaned_trials(study, spec, sweep_dir, tokens, stopped)

    try:
        if local:
            run_local(workers, on_dead)
        else:
            run_jobs(executor, workers, on_dead)
    except BaseException:  # stopped (Ctrl-C, a time limit): a search run in pieces shows where it stands
        # Hydra's multirun-end callback, which writes the summary, does not run after a stop
        write_summary(sweep_dir, swept_keys(config))
        raise
    finally:
        report(study, sweep_dir, plots=sweeper.plots, step_unit=sweeper.prune_on)
