"""A worker: the loop that asks the study for trials and runs each one's training job in turn, and how a
trial ends in the study (complete, pruned, failed, or stopped and queued again to resume)."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobStatus, configure_log, run_job, setup_globals
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from seq2seq import private_apis
from seq2seq.errors import UserError
from seq2seq.private_apis import failed_job_error, study_storage, trial_id
from seq2seq.sweeper.space import override_value, trial_overrides
from seq2seq.sweeper.storage import (
    ERROR,
    HOST_PID,
    WORKER,
    fail_orphaned_trials,
    fail_trial,
    interrupted,
    optuna_state,
    study_lock,
)
from seq2seq.trial import PRUNED_AT, RETRY_OF, TRIAL_ENV, StudySpec

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

# A trial user attribute: which attempt's last checkpoint a retry resumed.
RESUMED_FROM = "resumed_from"


@dataclass
class Worker:
    """One worker: asks the study for trials and runs them, one after the other, until the study has
    ``n_trials`` complete, pruned or running ones (or ``max_failed`` failed ones)."""

    index: int
    token: str  # names this worker in its trials' user attributes
    spec: StudySpec
    sweeper: DictConfig  # hydra.sweeper as written
    space: dict[str, Any]
    fixed: list[str]  # the command line's other overrides
    hydra_context: HydraContext
    task_function: TaskFunction
    config: DictConfig
    cpus: list[int] | None = None  # local workers: the CPU cores this worker may use
    gpus: list[str] | None = None  # local workers on GPUs: this worker's CUDA_VISIBLE_DEVICES
    singletons: Any = None  # Hydra's global state, for a worker in a fresh process (submitit)
    resumed: bool = False  # the study had trials before this command

    def __call__(self) -> None:
        if self.singletons is not None:
            Singleton.set_state(self.singletons)
            setup_globals()
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        if self.gpus:  # before anything initialises CUDA in this process
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
        if self.cpus:
            os.sched_setaffinity(0, self.cpus)
            os.environ["OMP_NUM_THREADS"] = str(len(self.cpus))
            if "torch" in __import__("sys").modules:
                import torch

                torch.set_num_threads(len(self.cpus))
        study = self.spec.load(sampler=worker_sampler(self.sweeper.sampler, self.index, self.resumed))
        while (trial := self.next_trial(study)) is not None:
            self.run_trial(study, trial)

    def next_trial(self, study: optuna.Study) -> optuna.Trial | None:
        """The next trial (a queued one first), or None when the study has all it needs. Under a lock
        file in the sweep folder, so that workers asking at once never overshoot ``n_trials``."""
        sweep_dir = Path(self.config.hydra.sweep.dir)
        with study_lock(sweep_dir):
            # A trial whose worker died still counts as running until someone fails it: do it here, so
            # that this worker takes its place rather than stopping short of n_trials.
            fail_orphaned_trials(study, self.spec, sweep_dir)
            trials = study.get_trials(deepcopy=False)
            states = [t.state.name for t in trials]
            claimed = sum(states.count(s) for s in ("COMPLETE", "PRUNED", "RUNNING"))
            # A trial interrupted by a stop (Ctrl-C, a job's time limit) is no failure of its recipe: a
            # search run in many pieces would otherwise stop for good after n_trials / workers pieces.
            failed = sum(t.state.name == "FAIL" and not interrupted(t) for t in trials)
            max_failed = self.sweeper.max_failed_trials
            if claimed >= self.sweeper.n_trials:
                return None
            if failed >= (self.sweeper.n_trials if max_failed is None else max_failed):
                log.error("Worker %d stops: the study has %d failed trials", self.index, failed)
                return None
            trial = study.ask(self.space)
            trial.set_user_attr(WORKER, self.token)
            trial.set_user_attr(HOST_PID, f"{socket.gethostname()}:{os.getpid()}")
            return trial

    def run_trial(self, study: optuna.Study, trial: optuna.Trial) -> None:
        """Run the training job of ``trial`` in this process and tell the study how it ended."""
        overrides = trial_overrides(self.fixed, trial.params) + self.resume(study, trial)
        log.info("Worker %d: trial %d: %s", self.index, trial.number, " ".join(overrides))
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = f"{self.spec.name}_{trial.number}"
            sweep_config.hydra.job.num = trial.number
        HydraConfig.instance().set_config(sweep_config)
        pruner = self.sweeper.pruner
        os.environ[TRIAL_ENV] = json.dumps(
            {
                "storage": self.spec.storage,
                "study": self.spec.name,
                "trial": trial.number,
                "pruner": OmegaConf.to_container(pruner, resolve=True) if pruner else None,
                "prune_on": self.sweeper.prune_on,
                "heartbeat_interval": self.spec.heartbeat_interval,
            }
        )
        heartbeat = Heartbeat(study, trial) if self.spec.heartbeat_interval else None
        try:
            result = run_job(
                hydra_context=self.hydra_context,
                task_function=self.task_function,
                config=sweep_config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
        except BaseException as error:  # Ctrl-C, SIGTERM: the study must not keep a running trial
            # failed, recorded in the trial's folder (a stop before the run began leaves no record of its
            # own) and queued again: the next command resumes it
            error_text = f"interrupted ({type(error).__name__})"
            trial_dir = Path(self.config.hydra.sweep.dir, str(trial.number))
            fail_trial(study, self.spec, trial, error_text, trial_dir, status="interrupted")
            raise
        finally:
            os.environ.pop(TRIAL_ENV, None)
            if heartbeat:
                heartbeat.stop()
        self.tell(study, trial, result)

    def resume(self, study: optuna.Study, trial: optuna.Trial) -> list[str]:
        """A retry of an interrupted trial goes on from the newest checkpoint of its latest attempt that has
        one, with that attempt's validations reported again (the pruner's rungs count the time already
        trained): the override that resumes it, or [] to start afresh."""
        original = trial.user_attrs.get(RETRY_OF)
        if original is None:
            return []
        attempts = [
            t
            for t in study.get_trials(deepcopy=False)
            if t.number < trial.number and original in (t.number, t.user_attrs.get(RETRY_OF))
        ]
        from seq2seq.slurm import newest_checkpoint  # imports Lightning: only where a trial runs

        for attempt in sorted(attempts, key=lambda t: t.number, reverse=True):
            # what a stopped run resumes from: last.ckpt, or a newer HPC checkpoint of a preempted job
            try:
                checkpoint = newest_checkpoint(Path(self.config.hydra.sweep.dir, str(attempt.number)))
            except UserError as error:  # a save cut off by a kill: an older attempt's, or afresh
                log.warning(
                    "Trial %d: trial %d's checkpoint cannot be read: %s", trial.number, attempt.number, error
                )
                continue
            if checkpoint is not None:
                break
        else:
            return []
        pruner = instantiate(self.sweeper.pruner) if self.sweeper.pruner else None
        replay_reports(study, trial, attempt, pruner)
        trial.set_user_attr(RESUMED_FROM, attempt.number)
        log.info("Trial %d resumes trial %d from %s", trial.number, attempt.number, checkpoint)
        return [f"ckpt_path={override_value(str(checkpoint.resolve()))}"]

    def tell(self, study: optuna.Study, trial: optuna.Trial, result: Any) -> None:
        if result.status == JobStatus.FAILED:
            error = failed_job_error(result)
            trial.set_user_attr(ERROR, f"{type(error).__name__}: {error}")
            study.tell(trial, state=optuna_state("FAIL"))
            log.warning("Trial %d failed: %s: %s", trial.number, type(error).__name__, error)
            return
        stored = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        value = result.return_value
        if PRUNED_AT in stored.user_attrs:
            study.tell(trial, state=optuna_state("PRUNED"))
            log.info("Trial %d pruned at step %d", trial.number, stored.user_attrs[PRUNED_AT])
        elif isinstance(value, int | float):
            study.tell(trial, float(value))
            log.info("Trial %d complete: %g", trial.number, value)
        else:
            trial.set_user_attr(ERROR, f"the task returned {value!r}, not a number")
            study.tell(trial, state=optuna_state("FAIL"))


def replay_reports(
    study: optuna.Study, trial: optuna.Trial, attempt: optuna.trial.FrozenTrial, pruner: Any
) -> None:
    """Report ``attempt``'s validations again as ``trial``'s (its retry), each followed by the pruner, so
    that the pruner records the rungs they passed at the positions the attempt reached them. Reported
    alone, a successive-halving pruner would record the retry's first new value at every rung passed
    before it, against the other trials' values at those rungs: a late value that always wins. The
    replay's own answers are not acted on: the attempt was promoted when it got there."""
    for position, value in sorted(attempt.intermediate_values.items()):
        trial.report(value, position)
        if pruner is not None:
            pruner.prune(study, study_storage(study).get_trial(trial_id(trial)))


def worker_sampler(config: DictConfig | None, index: int, resumed: bool) -> Any:
    """Worker ``index``'s sampler, from ``hydra.sweeper.sampler`` (None: Optuna's default). A seeded
    sampler proposes the same values wherever it starts from that seed: only the first worker of a new
    study keeps the seed (a search that can be repeated); the other workers, and every worker of a
    command that continues a study, draw a fresh one, or they would repeat those proposals."""
    if not config:
        return None
    sampler = instantiate(config)
    if index > 0 or resumed:
        sampler.reseed_rng()
    return sampler


class Heartbeat:
    """Records a running trial's heartbeat in a database storage (Optuna's own ``optimize`` does this;
    ask-and-tell leaves it to the caller), so that a dead worker's trial is failed after the grace period."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial) -> None:
        self.stopped = threading.Event()
        storage, trial_id = study_storage(study), private_apis.trial_id(trial)
        interval = storage.get_heartbeat_interval()

        def beat() -> None:
            while not self.stopped.wait(interval):
                storage.record_heartbeat(trial_id)

        storage.record_heartbeat(trial_id)
        threading.Thread(target=beat, daemon=True).start()

    def stop(self) -> None:
        self.stopped.set()
