"""Every private name of Lightning, Hydra, OmegaConf and Optuna that this package uses, in one place,
each with why no public API serves and the version it was checked against.

tests/test_private_apis.py fails if a later release renames or removes any of them, or changes what
they do. The libraries are imported inside the functions (their arguments are the libraries' objects):
importing this module loads none of them, so the command layer and the translator can use it.
"""

from __future__ import annotations

from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import lightning as L
    import optuna
    from hydra.core.utils import JobReturn
    from lightning.pytorch.callbacks import ThroughputMonitor

CHECKED_VERSIONS = {"lightning": "2.6.6", "hydra-core": "1.3.8", "omegaconf": "2.3.1", "optuna": "5.1.0"}


def should_update_logs(trainer: L.Trainer) -> bool:
    """Whether what this training batch logs is written (every ``trainer.log_every_n_steps`` steps).

    Private: Lightning decides it from its count of batches that stepped (accumulation included) and
    whether the run stops; no public property says it, and recomputing it would drift from Lightning's.
    """
    return trainer._logger_connector.should_update_logs


def restart_finished_epoch(trainer: L.Trainer) -> None:
    """Make the loops' counts say where training really ended, so that a checkpoint saved after ``fit``
    returns resumes there: at the start of the next epoch if the epoch loop served its last batch (its
    counts are reset as Lightning resets them when the next epoch starts), else in the middle of the
    epoch it stopped in (max_steps, max_time, early stopping), as Lightning's own mid-epoch checkpoints do.

    Private: ``_num_ready_batches_reached`` is the epoch loop's own test of an epoch's end, and the
    progress trackers' ``reset_on_run`` is what Lightning calls at an epoch's start; there is no public
    "the epoch ended" state to save. A stop inside an epoch still runs the fit loop's ``on_advance_end``,
    which counts the epoch as processed and completed: without undoing that, the resumed run would start
    the next epoch with this one's batch count and skip the rest of this epoch.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    if epoch_loop._num_ready_batches_reached():
        epoch_loop.batch_progress.reset_on_run()
        epoch_loop.scheduler_progress.reset_on_run()
        epoch_loop.automatic_optimization.optim_progress.reset_on_run()
        epoch_loop.val_loop.batch_progress.total.reset()
        return
    epochs = trainer.fit_loop.epoch_progress
    if epochs.current.processed == epochs.current.started > 0:  # on_advance_end counted this epoch
        for tracker in (epochs.current, epochs.total):
            tracker.processed -= 1
            tracker.completed -= 1


class RequeueRequest(Protocol):
    """SLURM's requeue signal as :func:`check_sigterm_on_logging_steps` agrees on it
    (:class:`seq2seq.slurm.SlurmRequeue`): ``requested`` is set by the signal's handler, and
    ``save_and_requeue`` runs in every process together at the batch where they agree."""

    requested: bool

    def save_and_requeue(self) -> None: ...


def any_process(trainer: L.Trainer, *flags: bool) -> list[bool]:
    """Each flag, true if it is true in any process: one all-reduce (call it in every process at once)."""
    import torch

    values = torch.tensor([float(flag) for flag in flags], device=trainer.strategy.root_device)
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return [bool(value) for value in values.tolist()]


def check_sigterm_on_logging_steps(trainer: L.Trainer, requeue: RequeueRequest | None = None) -> None:
    """Under DDP, agree on a SIGTERM (and on SLURM's requeue signal) on logging steps only, not before
    every training batch, and act on them there, at a batch's start, in every process together.

    Lightning 2.6 broadcasts a SIGTERM flag from the first process and reads it on the host before every
    batch (``_TrainingEpochLoop._broadcast_sigterm_tensor``; Lightning-AI/pytorch-lightning#21487): a
    collective and a wait for the device each step. Its handler (``_SignalConnector._sigterm_notifier_fn``)
    also broadcasts from inside the signal handler, and a process that got the signal stops after its
    batch whatever the others do, so a SIGTERM to one process leaves the others waiting in their next
    collective. Here the handlers only note the signals (the SIGTERM one also passes it to the processes
    Lightning started, as Lightning's does); before the batch of each logging step
    (``trainer.log_every_n_steps``) the processes all-reduce their notes, once for both signals. If any
    noted SLURM's requeue signal (``requeue.requested``), all call ``requeue.save_and_requeue()`` there;
    if any got a SIGTERM, all then stop together with Lightning's SIGTERMException (which
    ``InterruptionCheckpoint`` answers with ``last.ckpt``). A single process acts before its next batch,
    without a collective. Call before ``fit``: the handler is installed there.

    Private: the epoch loop's broadcast is replaced by a no-op and its ``advance`` by one that agrees
    first (Lightning calls the broadcast only under DDP, and no public hook runs at a batch's start
    before the batch is fetched and counted), and the signal connector's notifier is replaced on the
    instance; no public hook replaces Lightning's handler.
    """
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    connector = trainer._signal_connector
    loop = trainer.fit_loop.epoch_loop
    noted = [False]  # a SIGTERM reached this process

    def note_sigterm(signum: int, frame: FrameType | None) -> None:
        if not noted[0] and trainer.strategy.launcher is not None:
            trainer.strategy.launcher.kill(signum)
        noted[0] = True
        if trainer.world_size == 1:
            connector.received_sigterm = True  # the training loop stops after this batch

    def agree_on_signals() -> None:
        requeue_noted = requeue is not None and requeue.requested
        if trainer.world_size == 1:
            stop, requeue_now = False, requeue_noted  # Lightning stops a single process on its SIGTERM
        elif should_update_logs(trainer):
            stop, requeue_now = any_process(trainer, noted[0], requeue_noted)
        else:
            return
        if requeue_now:
            requeue.save_and_requeue()
        if stop:
            connector.received_sigterm = True
            raise SIGTERMException

    advance = loop.advance

    def agree_then_advance(*args: Any, **kwargs: Any) -> None:
        agree_on_signals()
        advance(*args, **kwargs)

    connector._sigterm_notifier_fn = note_sigterm
    loop._broadcast_sigterm_tensor = lambda: None  # agreed on in agree_then_advance instead
    loop.advance = agree_then_advance


def agree_on_timed_validation(trainer: L.Trainer) -> None:
    """Under DDP with a validation interval in seconds (``trainer.val_check_interval='DD:HH:MM:SS'``),
    validate when any process's clock says the interval has passed, checked on logging steps, in every
    process at the same step.

    Lightning 2.6 asks each process's own clock after every batch (``_should_check_val_fx``); the clocks
    start as each process gets its training loader and restart after each validation, so one process
    went to validate while another trained on, and their collectives met out of order (a hang). Here the
    clock's answer is all-reduced on logging steps (a collective every ``trainer.log_every_n_steps``
    steps, not every step) and Lightning's own decision is then asked with that answer in place of its
    clock's; the other reasons to validate (an epoch's end, a stop) are the same on every process.

    Private: the epoch loop's ``_should_check_val_fx`` is wrapped on the instance, and it reads the
    trainer's ``_val_check_time_interval`` and ``_last_val_time`` (checked against Lightning 2.6.6).
    """
    import math
    import time

    loop = trainer.fit_loop.epoch_loop
    decide = loop._should_check_val_fx

    def agreed(*args: Any, **kwargs: Any) -> bool:
        interval = trainer._val_check_time_interval
        if interval is None or trainer.world_size == 1:
            return decide(*args, **kwargs)
        due = False
        if should_update_logs(trainer):
            (due,) = any_process(trainer, time.monotonic() - trainer._last_val_time >= interval)
        started = trainer._last_val_time
        trainer._last_val_time = -math.inf if due else math.inf  # the clock answers as agreed
        try:
            return decide(*args, **kwargs)
        finally:
            trainer._last_val_time = started

    loop._should_check_val_fx = agreed


def settle_unfinished_batch(trainer: L.Trainer) -> None:
    """Make the run's loop counts say where training stopped, before a checkpoint is saved while a batch
    was under way (Ctrl-C or an error), so that the resumed run trains each batch once and validates at
    the same steps as one never stopped.

    A batch whose optimizer step had not completed is forgotten: on restart Lightning rewinds the epoch's
    counts (``batch_progress.current``) to the last processed batch but not the run's (``.total``), and
    its epoch loop schedules validations from the run's count of batches begun (``total_batch_idx``); a
    batch counted as begun but never trained moved every later validation a step early (59, 89 instead
    of 60, 90) and added one at the end. A batch whose optimizer step completed is trained: what the loop
    does after its step (counting it as processed, stepping the per-step learning-rate schedule) is
    finished here, else the resumed run would train it again. A batch interrupted later (in
    ``on_train_batch_end``) already has its counts; nothing changes.

    Internal loop state (checked against Lightning 2.6.6): the progress trackers, ``_batches_that_stepped``
    (stepped batches before the current one: it counts a batch in ``on_advance_end``) against the
    optimizer's completed steps, and the loop's ``update_lr_schedulers``, as ``advance`` calls it. With one
    optimizer and per-step schedules of frequency 1, as :class:`~seq2seq.module.TranslationModule` has.
    """
    loop = trainer.fit_loop.epoch_loop
    batches = loop.batch_progress
    stepped_before = loop._batches_that_stepped
    if loop.automatic_optimization.optim_progress.optimizer.step.total.completed <= stepped_before:
        batches.total.ready = batches.total.started = batches.total.processed
        return
    if batches.total.processed < batches.total.started:
        batches.increment_processed()
    if loop.scheduler_progress.total.completed <= stepped_before:
        loop.update_lr_schedulers("step", update_plateau_schedulers=False)


def save_checkpoint_alone(trainer: L.Trainer, path: Path) -> None:
    """Save a checkpoint of this process's state to ``path`` (written by the first process only, as
    Lightning writes one), with no collective: for a process that stops on its own under DDP, while the
    others sit in collectives of their own.

    Private: ``Trainer.save_checkpoint`` ends in a barrier (``strategy.barrier``), which would meet
    another process's all-reduce, and hang or mix unrelated data; the checkpoint's contents come only
    from the checkpoint connector's ``dump_checkpoint`` (checked against Lightning 2.6.6), which calls
    no collective under DDP (the optimizer's state is each process's own).
    """
    checkpoint = trainer._checkpoint_connector.dump_checkpoint()
    trainer.strategy.save_checkpoint(checkpoint, path)


def batches_done_in_epoch(trainer: L.Trainer) -> int:
    """Training batches of the current epoch that went through a training step: the data position a
    resumed run continues from (the loader runs ahead of training by its prefetching, so its own count
    is not it).

    Internal loop state: the epoch loop's progress tracker is not underscored but is not documented API
    either; Lightning restores it from checkpoints itself.
    """
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed


def resume_at_batch_of_epoch(trainer: L.Trainer, count: int) -> None:
    """Set the epoch loop's count of this rank's batches done in the epoch to ``count``, when a run
    resumes mid-epoch on another number of ranks: Lightning restores the count as the old ranks saved it
    and ends the epoch when it reaches the new ranks' number of batches per epoch
    (``_num_ready_batches_reached``), so the count must be the new ranks' count at that position.

    Internal loop state (checked against Lightning 2.6.6): ``batch_progress.current``, restored from the
    checkpoint before the training loader's state is loaded and reset on restart to its ``completed``
    (after counting a batch saved at its end as completed); every counter moves by the same amount, so
    their differences (which tell Lightning where the checkpoint was saved) stay as saved.
    """
    current = trainer.fit_loop.epoch_loop.batch_progress.current
    shift = count - current.processed
    current.ready += shift
    current.started += shift
    current.processed += shift
    current.completed += shift


def failed_job_error(result: JobReturn) -> BaseException:
    """The exception that a failed Hydra job (``run_job``'s ``JobReturn``, status FAILED) raised.

    Private: ``JobReturn.return_value`` raises a failed job's exception (and writes a line to stderr)
    rather than returning it, and no public attribute holds it; ``run_job`` stores it in the dataclass
    field ``_return_value``. Checked against hydra-core 1.3.8.
    """
    return result._return_value


def config_root(node: Any) -> Any:
    """The root of the OmegaConf config that ``node`` belongs to (an unknown key's error holds only its
    parent node; the hint for it lists every key of the whole config).

    Private (``Node._get_root``, checked against omegaconf 2.3.1): OmegaConf offers no public way from a
    node up to its root; a node's ``_get_parent`` chain is private too.
    """
    return node._get_root()


def count_untimed_batch(monitor: ThroughputMonitor, stage: Any, batch: Any) -> None:
    """Count a batch into Lightning's ThroughputMonitor without reading its clock, as its ``_update``
    counts one (target tokens, samples, batches), for :class:`seq2seq.callbacks.ThroughputMonitor`, which
    times logging steps only.

    Private (checked against Lightning 2.6.6): the monitor's per-stage counters ``_lengths``,
    ``_samples`` and ``_batches``; its only counting path, ``_update``, also reads the clock (after a CUDA
    synchronisation) and has no public hook that counts alone.
    """
    if monitor.length_fn is not None:
        monitor._lengths[stage] += monitor.length_fn(batch)
    monitor._samples[stage] += monitor.batch_size_fn(batch)
    monitor._batches[stage] += 1


def set_available_flops(monitor: ThroughputMonitor, flops: float) -> None:
    """Give Lightning's ThroughputMonitor a peak FLOP/s for MFU where it knows none (a CPU).

    Private (checked against Lightning 2.6.6): the per-stage ``Throughput`` objects in ``_throughputs``
    copy the peak when ``setup`` builds them; the public ``available_flops`` is read only there.
    """
    monitor.available_flops = flops
    for throughput in monitor._throughputs.values():
        throughput.available_flops = flops


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """A trial's id in its study's storage (what the storage's methods take; ``number`` is per study).

    Private (``_trial_id``, checked against Optuna 5.1.0): Optuna keeps it private on both trial classes,
    and a sweeper that writes a trial's attributes without its ``Trial`` object (a dead worker's trial,
    a heartbeat thread) or rebuilds a ``Trial`` in another process needs it.
    """
    return trial._trial_id


def study_storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage object a study was opened with (heartbeats and a dead worker's trial attributes).

    Private (``Study._storage``, checked against Optuna 5.1.0): ``optuna.load_study`` takes a storage but
    the study does not expose the one it wraps (a URL given is wrapped in a cached storage).
    """
    return study._storage


def saved_best_checkpoint(state: dict[str, Any]) -> tuple[str | None, str | None, Any]:
    """(folder, best checkpoint's path, its score) from a ModelCheckpoint's state saved in a checkpoint.

    Private (checked against Lightning 2.6.6): the keys of ``ModelCheckpoint.state_dict``. Lightning
    restores them only into a callback whose folder did not change; a run resumed into a new folder
    (:class:`~seq2seq.callbacks.CarryBestCheckpoint`) reads and rewrites them before it does.
    """
    return state.get("dirpath"), state.get("best_model_path"), state.get("best_model_score")


def move_checkpoint_state(
    state: dict[str, Any], dirpath: str, best: str | None = None, score: Any = None
) -> None:
    """Rewrite a ModelCheckpoint's saved state for a callback in ``dirpath``, so that Lightning restores
    it: with ``best`` (a path in ``dirpath``) as its best and only kept checkpoint at ``score``, or with
    no checkpoint and no best score. Private: as :func:`saved_best_checkpoint`.
    """
    state.update(
        dirpath=dirpath, best_model_path=best or "", kth_best_model_path=best or "", last_model_path=""
    )
    state["best_k_models"] = {best: score} if best else {}
    state["best_model_score"] = score if best else None
    if best:
        state["kth_value"] = score
