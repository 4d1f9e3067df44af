"""Where the workers run: forked local processes (each on its own share of the CPU cores, and of the GPUs
where its trials train on GPUs) or submitit jobs, and the signals that stop the sweep; a worker that ends
badly has its trial failed."""

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

from seq2seq.errors import UserError, is_int
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


def gpus_per_worker(trainer: DictConfig) -> int:
    """How many GPUs each local worker's trials train on: ``trainer.devices`` where ``trainer.accelerator``
    is gpu or cuda (trainer=gpu), else 0 (a CPU sweep, whatever GPUs the machine has)."""
    if trainer.get("accelerator") not in ("gpu", "cuda"):
        return 0
    devices = trainer.get("devices")
    if not is_int(devices) or devices < 1:
        raise UserError(
            f"trainer.devices={devices}: local sweep workers on GPUs need a number of GPUs each"
            " (or hydra.sweeper.split_gpus=false: every worker sees all the GPUs)"
        )
    return devices


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (indices, or UUIDs); where it is
    unset, the indices of the GPUs the driver lists (counted through NVML: CUDA stays uninitialised, so
    the forked workers can still use it)."""
    names = os.environ.get("CUDA_VISIBLE_DEVICES")
    if names is not None:
        return [name.strip() for name in names.split(",") if name.strip()]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def gpu_shares(workers: int, per_worker: int) -> list[list[str]] | None:
    """The visible GPUs in ``workers`` shares of ``per_worker`` each (None: none asked for), in order;
    an error when there are fewer than the workers ask for."""
    if per_worker == 0:
        return None
    gpus = visible_gpus()
    if len(gpus) < workers * per_worker:
        raise UserError(
            f"hydra.sweeper.workers={workers} with trainer.devices={per_worker} GPU each needs"
            f" {workers * per_worker} GPUs; {len(gpus)} visible"
            f" (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
            " (hydra.sweeper.split_gpus=false lets the workers share them)"
        )
    return [gpus[i * per_worker : (i + 1) * per_worker] for i in range(workers)]


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
    except BaseException as stop:  # Ctrl-C or SIGTERM: let the workers record their trials
        if isinstance(stop, SystemExit) and stop.code == 128 + signal.SIGTERM:
            # SIGTERM to this process alone (``kill PID``) reaches no worker: pass it on, or they would run
            # the study on (multiprocessing waits for them as this process exits). One that had it too
            # sees it twice: in training that is one stop; elsewhere SIGTERM ends it at once anyway.
            for process in running:
                process.terminate()
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
