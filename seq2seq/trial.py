"""The trial protocol between the sweeper (seq2seq.sweeper) and a trial's training run (seq2seq.pruning):
the environment variable that names the trial, the user attributes both read, and how any process opens
the study (StudySpec, with the heartbeat's requeue of stale trials). Every training run imports it, so it
imports Optuna only when a study is opened.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.errors import HydraException
from omegaconf import DictConfig

from seq2seq.errors import user_path

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

# The trial a training job runs, for seq2seq.pruning: JSON {storage, study, trial, pruner, prune_on, ...}.
# An environment variable reaches every process of the job (Lightning's DDP processes inherit it).
TRIAL_ENV = "SEQ2SEQ_SWEEP_TRIAL"
JOURNAL_FILE = "optuna.journal"
# Trial user attributes: where a pruned trial stopped (set by seq2seq.pruning), which trial a retry
# repeats.
PRUNED_AT, RETRY_OF = "pruned_at_step", "retry_of"
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
