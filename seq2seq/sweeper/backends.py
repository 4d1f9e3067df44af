"""Where the workers run: forked local processes (each on its own share of the CPU cores) or submitit
jobs, and the signals that stop the sweep; a worker that ends badly has its trial failed."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import wait
from typing import Any

from omegaconf import DictConfig, OmegaConf

from seq2seq.sweeper.workers import Worker

log = logging.getLogger(__name__)


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
