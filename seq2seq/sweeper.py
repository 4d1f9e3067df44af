"""The sweeper behind ``hydra/sweeper=seq2seq``: asynchronous workers on one Optuna study.

``run_sweep`` opens the study (a journal file in the sweep folder, or a database URL), enqueues the
fixed points (the baseline) once per study, and starts N workers: local processes (forked, each on its
own share of the CPU cores) or, with a submitit launcher configured (``hydra/launcher=slurm``), one
submitit job each. A worker takes the next trial as soon as its last one ended: it asks the study,
runs the training job in the trial's own folder (``<sweep dir>/<trial number>``) with the trial's
values as overrides, and tells the study how it ended. Training reports each validation to the trial
(seq2seq.pruning) and stops when the pruner says so. A worker that dies leaves its trial failed (or
queued again); running the same command again continues the study up to ``n_trials``.
"""

from __future__ import annotations

import inspect
import json
import logging
import multiprocessing
import os
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.core.singleton import Singleton
from hydra.core.utils import JobStatus, configure_log, run_job, setup_globals
from hydra.errors import HydraException
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from seq2seq.errors import UserError, user_path
from seq2seq.sweep import swept_keys, write_result, write_summary

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

# The trial a training job runs, for seq2seq.pruning: JSON {storage, study, trial, pruner, prune_on, ...}.
# An environment variable reaches every process of the job (Lightning's DDP processes inherit it).
TRIAL_ENV = "SEQ2SEQ_SWEEP_TRIAL"
JOURNAL_FILE = "optuna.journal"
# Trial user attributes: which worker runs it (to fail it when the worker dies), why it failed, where
# a pruned trial stopped (set by seq2seq.pruning), which trial a retry repeats, which attempt's last
# checkpoint it resumed.
WORKER, HOST_PID, ERROR, PRUNED_AT = "worker", "host_pid", "error", "pruned_at_step"
RETRY_OF, RESUMED_FROM = "retry_of", "resumed_from"
FIXED_POINTS_DONE = "fixed_points_enqueued"
NO_TIME_BUDGET = "hydra.sweeper.prune_on=seconds: the trials have no time budget (set trainer.max_time)"


def require_optuna() -> Any:
    """Optuna >= 4, or a one-line error naming the extra that installs it."""
    try:
        import optuna
    except ImportError:
        raise HydraException(
            "hydra/sweeper=seq2seq needs Optuna: pip install 'seq2seq-lstm[sweep]'"
        ) from None
    if int(optuna.__version__.split(".")[0]) < 4:
        raise HydraException(
            f"hydra/sweeper=seq2seq needs Optuna >= 4 (found {optuna.__version__}):"
            " pip install 'seq2seq-lstm[sweep]'"
        )
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our log says what each trial did
    return optuna


# --- the search space ----------------------------------------------------------------------------------


def distribution(override: Override) -> Any:
    """An Optuna distribution for a sweep override: ``choice(a, b)``, ``range(start, stop[, step])``
    (stop excluded, as in Hydra's grid sweeps), ``interval(low, high)`` and ``tag(log, interval(...))``."""
    import optuna.distributions as d

    value = override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return d.CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        if any(isinstance(x, float) for x in (value.start, value.stop, value.step)):
            steps = int((value.stop - value.start) / value.step - 1e-9)
            return d.FloatDistribution(value.start, value.start + steps * value.step, step=value.step)
        last = value.start + (value.stop - 1 - value.start) // value.step * value.step
        return d.IntDistribution(int(value.start), int(last), step=int(value.step))
    if override.is_interval_sweep():
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return d.IntDistribution(value.start, value.end, log=log_scale)
        return d.FloatDistribution(value.start, value.end, log=log_scale)
    raise UserError(f"hydra.sweeper.params: {override.input_line} is not a choice, range or interval")


def search_space(params: Mapping[str, Any], arguments: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The distributions of ``hydra.sweeper.params`` and of the command line's sweep overrides, and the
    command line's other overrides, passed to every trial as they are. The command line wins: a sweep
    override replaces the key's distribution, one value takes the key out of the search."""
    parser = OverridesParser.create()
    space, fixed = {}, []
    declared = [f"{key}={value}" for key, value in params.items()]
    for line in declared + list(arguments):
        override = parser.parse_override(line)
        if override.is_sweep_override():
            space[override.get_key_element()] = distribution(override)
        elif line not in declared:
            fixed.append(line)
            space.pop(override.get_key_element(), None)
        else:
            raise UserError(f"hydra.sweeper.params: {line} is one value, not a choice, range or interval")
    return space, fixed


def override_value(value: Any) -> str:
    """A trial's value as Hydra reads it on the command line."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, str) and not re.fullmatch(r"[\w./:+-]+", value):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def trial_overrides(fixed: list[str], params: Mapping[str, Any]) -> list[str]:
    return [*fixed, *(f"{key}={override_value(value)}" for key, value in params.items())]


def in_space(dist: Any, value: Any) -> bool:
    import optuna.distributions as d

    if isinstance(dist, d.CategoricalDistribution):
        return value in dist.choices
    return isinstance(value, int | float) and not isinstance(value, bool) and dist.low <= value <= dist.high


def enqueue_fixed_points(
    study: optuna.Study, points: list[Any], space: dict[str, Any], config: DictConfig
) -> None:
    """Enqueue each fixed point once per study: its values for the swept keys it names, the composed
    config's values for the others (``{}``: the config as it is, the baseline every search should show)."""
    if study.user_attrs.get(FIXED_POINTS_DONE):
        return
    for index, point in enumerate(points):
        params = {}
        for key, dist in space.items():
            if key in point:
                value = point[key]
            elif key in config.hydra.runtime.choices:  # a config group, as experiment=...
                value = config.hydra.runtime.choices[key]
            else:
                value = OmegaConf.select(config, key, default=None)
            if not in_space(dist, value):
                raise UserError(
                    f"hydra.sweeper.fixed_points[{index}]: {key}={value} is outside the search space"
                    f" ({dist}); give it a value in the space, or fixed_points=[]"
                )
            params[key] = value
        study.enqueue_trial(params, user_attrs={"fixed_point": index})
    study.set_user_attr(FIXED_POINTS_DONE, True)


# --- storage -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudySpec:
    """How any process (a worker, a training job's rank 0) opens the study."""

    storage: str  # a database URL, or the path of a journal file
    name: str
    direction: str
    heartbeat_interval: int | None = None
    retry_killed: int = 0

    @classmethod
    def of(cls, sweeper: DictConfig, sweep_dir: Path) -> StudySpec:
        """The study of a sweep: ``hydra.sweeper`` as written, the journal in ``sweep_dir`` by default."""
        return cls(
            storage=str(sweeper.storage or (sweep_dir / JOURNAL_FILE)),
            name=sweeper.study_name,
            direction=sweeper.direction,
            heartbeat_interval=sweeper.heartbeat_interval,
            retry_killed=sweeper.retry_killed,
        )

    def open_storage(self) -> Any:
        optuna = require_optuna()
        if "://" not in self.storage:
            from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

            # The open lock (O_EXCL) works on network file systems, where symbolic links may not.
            with user_path(self.storage, "hydra.sweeper.storage"):  # a missing folder, no permission
                backend = JournalFileBackend(self.storage, lock_obj=JournalFileOpenLock(self.storage))
            return JournalStorage(backend)
        if not self.heartbeat_interval:
            return optuna.storages.RDBStorage(self.storage)
        callback = StaleTrialRetry(self.retry_killed) if self.retry_killed else None
        parameters = inspect.signature(optuna.storages.RDBStorage).parameters
        name = (
            "heartbeat_stale_trial_callback"
            if "heartbeat_stale_trial_callback" in parameters
            else "failed_trial_callback"
        )
        return optuna.storages.RDBStorage(
            self.storage,
            heartbeat_interval=self.heartbeat_interval,
            grace_period=2 * self.heartbeat_interval,
            **{name: callback},
        )

    def load(self, sampler: Any = None, pruner: Any = None) -> optuna.Study:
        optuna = require_optuna()
        return optuna.create_study(
            storage=self.open_storage(),
            study_name=self.name,
            direction=self.direction,
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )


class StaleTrialRetry:
    """Optuna's heartbeat callback: queue a stale trial again with its values (as requeue() does)."""

    def __init__(self, max_retry: int) -> None:
        self.max_retry = max_retry

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        requeue(study, trial, self.max_retry)


def requeue(study: optuna.Study, trial: optuna.Trial | optuna.trial.FrozenTrial, max_retry: int) -> None:
    """Queue ``trial``'s values again, unless its original trial has been retried ``max_retry`` times."""
    original = trial.user_attrs.get(RETRY_OF, trial.number)
    retries = sum(t.user_attrs.get(RETRY_OF) == original for t in study.get_trials(deepcopy=False))
    if retries < max_retry:
        study.enqueue_trial(trial.params, user_attrs={RETRY_OF: original})
        log.info("Trial %d queued again (retry %d of %d)", trial.number, retries + 1, max_retry)


def fail_trial(
    study: optuna.Study,
    spec: StudySpec,
    trial: optuna.trial.FrozenTrial,
    error: str,
    output_dir: Path,
    status: str = "failed",
) -> None:
    """Record a trial whose worker stopped without telling the study: failed, in the study and in its
    result.json (which the summary reads; ``status`` failed, or interrupted when the sweep was stopped),
    and queued again if so configured."""
    study._storage.set_trial_user_attr(trial._trial_id, ERROR, error)  # the trial object is not ours
    study.tell(trial.number, state=optuna_state("FAIL"), skip_if_finished=True)
    log.warning("Trial %d failed: %s", trial.number, error)
    write_result(output_dir, status=status, error=error, overrides=trial_overrides([], trial.params))
    requeue(study, trial, spec.retry_killed)


def optuna_state(name: str) -> Any:
    from optuna.trial import TrialState

    return TrialState[name]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs: a killed worker whose parent has not reaped it yet
    (a zombie) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not Path("/proc").is_dir():
        return True  # not Linux: the process exists, zombie or not
    try:
        # "pid (name) state ...": the name in parentheses may hold spaces
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False  # it ended just now


@contextmanager
def study_lock(sweep_dir: Path) -> Iterator[None]:
    """A lock file in the sweep folder for the study's read-then-write steps (asking for a trial under
    ``n_trials``, failing a dead worker's trial once), across the workers and the sweep's own process."""
    from optuna.storages.journal import JournalFileOpenLock

    lock = JournalFileOpenLock(str(sweep_dir / "ask"))
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def fail_stale_trials(study: optuna.Study) -> None:
    """Optuna's failing of trials without a heartbeat (database storages with heartbeat_interval)."""
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def fail_orphaned_trials(
    study: optuna.Study,
    spec: StudySpec,
    sweep_dir: Path,
    dead_workers: set[str] = frozenset(),
    stopped: bool = False,
) -> None:
    """Fail the running trials whose worker is gone: one of ``dead_workers`` (ended by the sweep's stop,
    if ``stopped``), or a process of this host that no longer runs (killed, or left by a command killed
    before). Database storages with a heartbeat also fail trials that stopped beating (on any host).
    Call it under ``study_lock``."""
    fail_stale_trials(study)
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(optuna_state("RUNNING"),)):
        worker = trial.user_attrs.get(WORKER)
        trial_host, _, pid = str(trial.user_attrs.get(HOST_PID, "")).rpartition(":")
        status = "failed"
        if worker in dead_workers:
            error = f"its worker ({worker}) stopped during the trial"
            if stopped:  # the sweep's stop ended it before it could record the trial
                error, status = f"interrupted ({error})", "interrupted"
        elif trial_host == host and pid.isdigit() and not pid_alive(int(pid)):
            error = f"its worker (process {pid} on {host}) is gone"
        else:
            continue
        fail_trial(study, spec, trial, error, sweep_dir / str(trial.number), status)


# --- workers -------------------------------------------------------------------------------------------


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
    singletons: Any = None  # Hydra's global state, for a worker in a fresh process (submitit)
    resumed: bool = False  # the study had trials before this command

    def __call__(self) -> None:
        if self.singletons is not None:
            Singleton.set_state(self.singletons)
            setup_globals()
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
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
            states = [t.state.name for t in study.get_trials(deepcopy=False)]
            claimed = sum(states.count(s) for s in ("COMPLETE", "PRUNED", "RUNNING"))
            max_failed = self.sweeper.max_failed_trials
            if claimed >= self.sweeper.n_trials:
                return None
            if states.count("FAIL") >= (self.sweeper.n_trials if max_failed is None else max_failed):
                log.error("Worker %d stops: the study has %d failed trials", self.index, states.count("FAIL"))
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
            trial.set_user_attr(ERROR, f"interrupted ({type(error).__name__})")
            study.tell(trial, state=optuna_state("FAIL"))
            requeue(study, trial, self.spec.retry_killed)  # the next command resumes it
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
            checkpoint = newest_checkpoint(Path(self.config.hydra.sweep.dir, str(attempt.number)))
            if checkpoint is not None:
                break
        else:
            return []
        for position, value in sorted(attempt.intermediate_values.items()):
            trial.report(value, position)
        trial.set_user_attr(RESUMED_FROM, attempt.number)
        log.info("Trial %d resumes trial %d from %s", trial.number, attempt.number, checkpoint)
        return [f"ckpt_path={override_value(str(checkpoint.resolve()))}"]

    def tell(self, study: optuna.Study, trial: optuna.Trial, result: Any) -> None:
        if result.status == JobStatus.FAILED:
            error = result._return_value
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
        storage, trial_id = study._storage, trial._trial_id
        interval = storage.get_heartbeat_interval()

        def beat() -> None:
            while not self.stopped.wait(interval):
                storage.record_heartbeat(trial_id)

        storage.record_heartbeat(trial_id)
        threading.Thread(target=beat, daemon=True).start()

    def stop(self) -> None:
        self.stopped.set()


def cpu_shares(workers: int) -> list[list[int]] | None:
    """The CPU cores this process may use, in ``workers`` equal shares (None: fewer cores than workers)."""
    cpus = sorted(os.sched_getaffinity(0))
    share = len(cpus) // workers
    if share == 0:
        log.warning("%d workers on %d CPU cores: cores are not split between workers", workers, len(cpus))
        return None
    return [cpus[i * share : (i + 1) * share] for i in range(workers)]


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM (``kill``, a scheduler's time limit) stops the sweep's own process as Ctrl-C does, by an
    exception, so that it still waits for its workers and reports the study. Not in the workers: there
    Lightning handles SIGTERM during training, which saves the trial's last.ckpt."""

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_local(workers: list[Worker], on_dead: Callable[[set[str], bool], None]) -> None:
    """Each worker in a forked process; returns when all have ended. A worker that ends by a signal or
    an error has its running trial failed at once (``on_dead``); the others go on."""
    context = multiprocessing.get_context("fork")  # Hydra's state and the task function, as they are
    processes = {context.Process(target=worker, name=f"worker-{worker.index}"): worker for worker in workers}
    for process in processes:
        process.start()
    running = dict(processes)
    try:
        with sigterm_raises():
            while running:
                for sentinel in wait([p.sentinel for p in running]):
                    process = next(p for p in running if p.sentinel == sentinel)
                    worker = running.pop(process)
                    process.join()
                    if process.exitcode != 0:
                        log.warning("Worker %d ended with exit code %s", worker.index, process.exitcode)
                        on_dead({worker.token}, False)
    except BaseException:  # Ctrl-C or SIGTERM reached the workers too: let them record their trials
        for process in running:
            process.join(timeout=60)
        # A worker the signal reached outside training (starting a trial, between two) ended at once,
        # leaving its trial running; one that recorded its trial has none left running.
        on_dead({running[p].token for p in running if p.exitcode not in (0, None)}, True)
        raise


def submitit_executor(config: DictConfig) -> Any | None:
    """A submitit executor built from ``hydra.launcher`` when it is hydra-submitit-launcher's
    (``hydra/launcher=slurm``, ``submitit_local``): each worker becomes one job. None otherwise."""
    launcher = config.hydra.launcher
    target = str(launcher.get("_target_", ""))
    if "hydra_submitit_launcher" not in target:
        return None
    import submitit

    cluster = "local" if target.endswith("LocalLauncher") else "slurm"
    params = OmegaConf.to_container(launcher, resolve=True)
    params.pop("_target_")
    executor = submitit.AutoExecutor(folder=params.pop("submitit_folder"), cluster=cluster)
    common = {
        "timeout_min",
        "name",
        "nodes",
        "mem_gb",
        "cpus_per_task",
        "gpus_per_node",
        "tasks_per_node",
        "stderr_to_stdout",
    }
    executor.update_parameters(
        **{
            key if key in common else f"{cluster}_{key}": value
            for key, value in params.items()
            if value is not None
        }
    )
    return executor


def run_jobs(
    executor: Any, workers: list[Worker], on_dead: Callable[[set[str], bool], None], poll_s: float = 5.0
) -> None:
    """Each worker as one submitit job; returns when all have ended, failing the trial of a job that ended
    badly (killed, timed out, preempted)."""
    jobs = {executor.submit(worker): worker for worker in workers}
    log.info("Submitted %d workers: jobs %s", len(jobs), ", ".join(job.job_id for job in jobs))
    with sigterm_raises():
        while jobs:
            time.sleep(poll_s)
            for job in [job for job in jobs if job.done()]:
                worker = jobs.pop(job)
                if (error := job.exception()) is not None:
                    log.warning("Worker %d (job %s) ended badly: %s", worker.index, job.job_id, error)
                    on_dead({worker.token}, False)


# --- the sweep -----------------------------------------------------------------------------------------


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
    spec = StudySpec.of(sweeper, sweep_dir)
    study = spec.load()
    resumed = bool(study.trials)
    with study_lock(sweep_dir):
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
    executor = submitit_executor(config)
    shares = cpu_shares(sweeper.workers) if executor is None and sweeper.split_cpus else None
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
            resumed=resumed,
            singletons=Singleton.get_state() if executor is not None else None,
        )
        for i in range(sweeper.workers)
    ]

    def on_dead(tokens: set[str], stopped: bool) -> None:
        with study_lock(sweep_dir):
            fail_orphaned_trials(study, spec, sweep_dir, tokens, stopped)

    try:
        if executor is None:
            run_local(workers, on_dead)
        else:
            run_jobs(executor, workers, on_dead)
    except BaseException:  # stopped (Ctrl-C, a time limit): a search run in pieces shows where it stands
        # Hydra's multirun-end callback, which writes the summary, does not run after a stop
        write_summary(sweep_dir, swept_keys(config))
        raise
    finally:
        report(study, sweep_dir, plots=sweeper.plots, step_unit=sweeper.prune_on)


def report(study: optuna.Study, sweep_dir: Path, plots: bool, step_unit: str = "steps") -> None:
    """Log the best trial; write the study's plots into the sweep folder (``step_unit``: what the
    trials' reports count, steps or seconds of training)."""
    states = [t.state.name for t in study.trials]
    counts = ", ".join(
        f"{states.count(s)} {s.lower()}"
        for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")
        if s in states
    )
    log.info("Study %s: %s", study.study_name, counts or "no trials")
    if "COMPLETE" in states:
        best = study.best_trial
        log.info(
            "Best: trial %d, %g, %s", best.number, best.value, " ".join(trial_overrides([], best.params))
        )
    if plots:
        write_plots(study, sweep_dir, step_unit)


PLOTS = ("optimization_history", "intermediate_values", "param_importances")


LEGEND_ROWS = 15  # Optuna's PNG legends have a row per trial: more go in columns


def write_plots(study: optuna.Study, sweep_dir: Path, step_unit: str = "steps") -> None:
    """``<plot>.html`` (plotly, interactive) and ``<plot>.png`` (matplotlib) for each of PLOTS; a plot
    the study cannot make yet (too few trials) or a missing plotting library is a warning. The
    intermediate values' x axis says ``step_unit`` (Optuna calls every report's position a step)."""
    import warnings

    import optuna.visualization as plotly_plots

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        for name in PLOTS:
            try:
                interactive = getattr(plotly_plots, f"plot_{name}")(study)
                if name == "intermediate_values":
                    interactive.update_xaxes(title_text=f"{step_unit} of training")
                interactive.write_html(sweep_dir / f"{name}.html")
            except (ImportError, ValueError, RuntimeError) as error:
                log.warning("No %s.html: %s", name, error)
            try:
                import matplotlib

                matplotlib.use("Agg")
                import matplotlib.pyplot as plt
                import optuna.visualization.matplotlib as matplotlib_plots

                axes = getattr(matplotlib_plots, f"plot_{name}")(study)
                figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
                if name == "intermediate_values":
                    axes.set_xlabel(f"{step_unit} of training")
                    handles, labels = axes.get_legend_handles_labels()
                    if len(labels) > LEGEND_ROWS:  # else dozens of trials set the figure's height
                        columns = -(-len(labels) // LEGEND_ROWS)
                        axes.legend(
                            handles, labels, bbox_to_anchor=(1.02, 1.0), loc="upper left", ncol=columns
                        )
                        figure.set_size_inches(11, 5)
                figure.savefig(sweep_dir / f"{name}.png", dpi=120, bbox_inches="tight")
                plt.close(figure)
            except (ImportError, ValueError, RuntimeError) as error:
                log.warning("No %s.png: %s", name, error)
