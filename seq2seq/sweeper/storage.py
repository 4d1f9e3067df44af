"""The study's storage as the sweep's processes share it: the lock for its read-then-write steps, and
the trials that a dead or stopped worker left running, failed (and queued again if so configured)."""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seq2seq.private_apis import study_storage, trial_id
from seq2seq.sweep import RESULT_FILE, write_result
from seq2seq.sweeper.space import trial_overrides
from seq2seq.trial import StudySpec, requeue

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

# Trial user attributes: which worker runs it (to fail it when the worker dies), why it failed.
WORKER, HOST_PID, ERROR = "worker", "host_pid", "error"


def fail_trial(
    study: optuna.Study,
    spec: StudySpec,
    trial: optuna.Trial | optuna.trial.FrozenTrial,
    error: str,
    output_dir: Path,
    status: str = "failed",
) -> None:
    """Record a trial that stopped without telling the study: failed, in the study and in its result.json
    (which the summary reads; ``status`` failed, or interrupted when the sweep was stopped; a record the
    run left with that status, which knows its training minutes, is kept), and queued again if so
    configured."""
    study_storage(study).set_trial_user_attr(trial_id(trial), ERROR, error)  # the trial object is not ours
    study.tell(trial.number, state=optuna_state("FAIL"), skip_if_finished=True)
    log.warning("Trial %d failed: %s", trial.number, error)
    if read_status(output_dir) != status:
        write_result(output_dir, status=status, error=error, overrides=trial_overrides([], trial.params))
    requeue(study, trial, spec.retry_killed)


# A running trial that names no worker this long after it started was left by a worker that died asking.
ORPHAN_AFTER = datetime.timedelta(minutes=1)


def started_before(trial: optuna.trial.FrozenTrial, age: datetime.timedelta) -> bool:
    """Whether ``trial`` started more than ``age`` ago (a storage's start time may be naive or not)."""
    start = trial.datetime_start
    return start is not None and datetime.datetime.now(start.tzinfo) - start > age


def interrupted(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a failed trial was ended by a stop of its sweep (Ctrl-C, a job's time limit), not by its
    recipe: its error says so, as :func:`fail_trial` records it."""
    return str(trial.user_attrs.get(ERROR, "")).startswith("interrupted")


def read_status(output_dir: Path) -> str | None:
    """The status a run recorded in its result.json, or None where it recorded none (or a torn one)."""
    try:
        return json.loads(Path(output_dir, RESULT_FILE).read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError):
        return None


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
        elif worker is None and started_before(trial, ORPHAN_AFTER):
            # a worker names its trial right after asking for it (milliseconds): this one died in between
            error = "its worker stopped while asking for it"
        elif trial_host == host and pid.isdigit() and not pid_alive(int(pid)):
            error = f"its worker (process {pid} on {host}) is gone"
        else:
            continue
        fail_trial(study, spec, trial, error, sweep_dir / str(trial.number), status)
