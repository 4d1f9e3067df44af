"""Every private Lightning name this package uses, in one place, each with why no public API serves.

Checked against Lightning 2.6.6 (the version pinned by pyproject.toml's range when written);
tests/test_lightning_private.py fails if a later Lightning renames or removes any of them.
"""

from __future__ import annotations

import lightning as L

CHECKED_VERSION = "2.6.6"


def should_update_logs(trainer: L.Trainer) -> bool:
    """Whether what this training batch logs is written (every ``trainer.log_every_n_steps`` steps).

    Private: Lightning decides it from its count of batches that stepped (accumulation included) and
    whether the run stops; no public property says it, and recomputing it would drift from Lightning's.
    """
    return trainer._logger_connector.should_update_logs


def restart_finished_epoch(trainer: L.Trainer) -> None:
    """If the epoch loop has served its last batch, reset its counts as Lightning does when the next
    epoch starts, so that a checkpoint saved now resumes at the start of the next epoch.

    Private: ``_num_ready_batches_reached`` is the epoch loop's own test of an epoch's end, and the
    progress trackers' ``reset_on_run`` is what Lightning calls at an epoch's start; there is no public
    "the epoch ended" state to save.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    if epoch_loop._num_ready_batches_reached():
        epoch_loop.batch_progress.reset_on_run()
        epoch_loop.scheduler_progress.reset_on_run()
        epoch_loop.automatic_optimization.optim_progress.reset_on_run()
        epoch_loop.val_loop.batch_progress.total.reset()


def batches_done_in_epoch(trainer: L.Trainer) -> int:
    """Training batches of the current epoch that went through a training step: the data position a
    resumed run continues from (the loader runs ahead of training by its prefetching, so its own count
    is not it).

    Internal loop state: the epoch loop's progress tracker is not underscored but is not documented API
    either; Lightning restores it from checkpoints itself.
    """
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed
