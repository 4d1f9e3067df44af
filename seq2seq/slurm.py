"""SLURM's requeue signal over the whole run, not only inside ``fit``.

With ``#SBATCH --signal=SIGUSR1@90`` SLURM warns a job before its time limit. Lightning handles that
signal only while ``fit`` runs (its SLURM handler is registered and removed there); during data
preparation, alpha tuning or test decoding the signal's default action killed the job, unrequeued.
:class:`SlurmRequeue` handles it from the start of the run to its end: during ``fit`` it saves
``hpc_ckpt_N.ckpt`` into the run directory as Lightning does (keeping only the newest), in every phase
it asks SLURM to requeue the job (``scontrol requeue``), then lets the phase go on until SLURM stops
the job. Lightning leaves a signal that already has a handler to it, and restores it after ``fit``.
The requeued job, started in the same run directory, resumes from :func:`newest_checkpoint`: the HPC
checkpoint or the ``last.ckpt`` saved when SLURM stopped the job, whichever is newer; a job whose
training had ended goes straight to the evaluation after it.
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

from seq2seq.checkpoints import save_resume_checkpoint

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
    """The checkpoint a requeued job resumes from: the newest of the HPC checkpoints and
    ``checkpoints/last.ckpt`` (None if there is neither)."""
    candidates = [*hpc_checkpoints(run_dir), run_dir / "checkpoints" / "last.ckpt"]
    existing = [path for path in candidates if path.is_file()]
    return max(existing, key=lambda path: path.stat().st_mtime_ns, default=None)


class SlurmRequeue:
    """Handles SLURM's requeue signal for the whole run (see the module docstring). ``phase`` names
    what the run is doing, for the log; ``trainer`` is set while ``fit`` runs."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.phase = "starting"
        self.trainer: L.Trainer | None = None

    @staticmethod
    def wanted() -> bool:
        """Under SLURM (as Lightning detects it), whose auto-requeue is on by default."""
        return SLURMEnvironment.detect() and SLURMEnvironment().auto_requeue

    def install(self) -> None:
        signal.signal(SLURMEnvironment().requeue_signal or signal.SIGUSR1, self.handle)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        log.info("SLURM requeue signal %d during %s", signum, self.phase)
        trainer = self.trainer
        if trainer is not None:
            for logger in trainer.loggers:  # as Lightning does: flush the metrics so far
                logger.finalize("finished")
            older = hpc_checkpoints(self.run_dir)
            number = int(older[-1].stem.rsplit("_", 1)[1]) + 1 if older else 1
            path = self.run_dir / f"hpc_ckpt_{number}.ckpt"
            save_resume_checkpoint(
                trainer, path, "training goes on"
            )  # on every rank, as SLURM signals each task
            if trainer.is_global_zero:
                for old in older:
                    old.unlink(missing_ok=True)
            log.info("Saved %s at step %d", path, trainer.global_step)
        if trainer.is_global_zero if trainer is not None else int(os.environ.get("SLURM_PROCID", 0)) == 0:
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
