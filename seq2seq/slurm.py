"""SLURM's requeue signal over the whole run, not only inside ``fit``.

With ``#SBATCH --signal=SIGUSR1@90`` SLURM warns a job before its time limit. Lightning handles that
signal only while ``fit`` runs (its SLURM handler is registered and removed there); during data
preparation, alpha tuning or test decoding the signal's default action killed the job, unrequeued.
:class:`SlurmRequeue` handles it from the start of the run to its end. Outside ``fit`` its handler asks
SLURM to requeue the job (``scontrol requeue``) and lets the phase go on until SLURM stops the job.
During ``fit`` the handler only notes the signal: saving there would run the checkpoint's barrier
inside a signal handler, wherever the process was (in the middle of a batch, or of a gradient
all-reduce that the barrier would meet), as Lightning's handler does. The processes agree on the note
at the start of a batch, on logging steps (:func:`~seq2seq.private_apis.check_sigterm_on_logging_steps`,
with SIGTERM's note, in one all-reduce), and there all save ``hpc_ckpt_N.ckpt`` into the run directory
together (keeping only the newest), at the same point as a SIGTERM's ``last.ckpt``; then the first asks
for the requeue. Lightning leaves a signal that already has a handler to it, and restores it after
``fit``. The requeued job, started in the same run directory, resumes from :func:`newest_checkpoint`:
the HPC checkpoint or the ``last.ckpt`` saved when SLURM stopped the job, whichever holds the later
step; a job whose training had ended goes straight to the evaluation after it.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from pathlib import Path
from types import FrameType

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

from seq2seq.checkpoints import read_checkpoint, save_resume_checkpoint

log = logging.getLogger(__name__)


def hpc_checkpoints(run_dir: Path) -> list[Path]:
    """The run directory's ``hpc_ckpt_N.ckpt`` files, oldest (lowest N) first."""
    found = [
        (int(m[1]), p)
        for p in run_dir.glob("hpc_ckpt_*.ckpt")
        if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))
    ]
    return [path for _, path in sorted(found)]


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a requeued job resumes from: of the HPC checkpoints and ``checkpoints/last.ckpt``,
    the one saved at the latest training step (at a tie ``last.ckpt``, saved when the job was stopped,
    then the HPC checkpoint numbered highest); None if there is none.

    Every process of the job chooses before they can talk to each other, so the choice reads what the
    files hold, alike on every node: their modification times can differ between nodes (a network file
    system's cached attributes), and processes that resumed different checkpoints would train apart.
    """
    candidates = [*hpc_checkpoints(run_dir), run_dir / "checkpoints" / "last.ckpt"]
    existing = [path for path in candidates if path.is_file()]

    def saved_step(order: int) -> tuple[int, int]:
        return int(read_checkpoint(existing[order], required=("global_step",))["global_step"]), order

    return existing[max(range(len(existing)), key=saved_step)] if existing else None


class SlurmRequeue:
    """Handles SLURM's requeue signal for the whole run (see the module docstring). ``phase`` names
    what the run is doing, for the log; ``trainer`` is set while ``fit`` runs; ``requested`` says that
    the signal came during ``fit`` and the processes have not yet acted on it."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.phase = "starting"
        self.trainer: L.Trainer | None = None
        self.requested = False

    @staticmethod
    def wanted() -> bool:
        """Under SLURM (as Lightning detects it), whose auto-requeue is on by default."""
        return SLURMEnvironment.detect() and SLURMEnvironment().auto_requeue

    def install(self) -> None:
        signal.signal(SLURMEnvironment().requeue_signal or signal.SIGUSR1, self.handle)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.trainer is not None:  # no collective here: noted, saved at a batch's start
            log.info(
                "SLURM requeue signal %d during fit: saving before a batch soon (a logging step's)", signum
            )
            self.requested = True
            return
        log.info("SLURM requeue signal %d during %s", signum, self.phase)
        if int(os.environ.get("SLURM_PROCID", 0)) == 0:
            requeue()

    def save_and_requeue(self) -> None:
        """Save ``hpc_ckpt_N.ckpt`` (removing the older ones) and requeue the job: called in every process
        together, at the start of a batch where they agreed on the signal."""
        trainer = self.trainer
        self.requested = False
        for logger in trainer.loggers:  # as Lightning does: write the metrics so far
            logger.save()
        older = hpc_checkpoints(self.run_dir)
        number = int(older[-1].stem.rsplit("_", 1)[1]) + 1 if older else 1
        # The first process's number for all: a later one may already see the first's new file.
        number = trainer.strategy.broadcast(number, src=0)
        path = self.run_dir / f"hpc_ckpt_{number}.ckpt"
        save_resume_checkpoint(trainer, path, "training goes on")
        log.info("Saved %s at step %d", path, trainer.global_step)
        if trainer.is_global_zero:
            for old in older:
                old.unlink(missing_ok=True)
            requeue()

    def fit_ended(self) -> None:
        """Training is over: a signal noted during ``fit`` but not yet acted on (training ended first,
        whose ``last.ckpt`` the requeued job resumes from) requeues the job now."""
        pending, self.requested = self.requested, False
        is_first = self.trainer is None or self.trainer.is_global_zero
        self.phase, self.trainer = "evaluation", None
        if pending and is_first:
            requeue()


def requeue() -> None:
    """``scontrol requeue`` this job (an array job's task by its own id)."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    result = subprocess.run(["scontrol", "requeue", job], check=False)
    if result.returncode == 0:
        log.info("Requeued SLURM job %s", job)
    else:
        log.warning("Requeueing SLURM job %s failed: scontrol exited %d", job, result.returncode)
