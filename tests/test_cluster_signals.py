"""Signals and failures on several ranks: SLURM's requeue signal acted on at a batch's end by every rank
together, ranks that give up waiting for a dead data preparer, and an exception on one rank that ends
the job instead of hanging it. Each runs real gloo processes with a time limit, so a hang fails."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.fault_callbacks import read_records
from tests.test_distributed import STOP_ONLY, checkpoint_state, record
from tests.test_training import QUIET, REPO

# Long enough for 2 gloo processes to start and train a few smoke steps on a loaded 2-core machine.
LIMIT = 150


def train_two_ranks(run: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python train.py experiment=smoke trainer=ddp_cpu`` (2 gloo processes); a hang is a failure."""
    command = [sys.executable, "train.py", "experiment=smoke", "trainer=ddp_cpu", f"hydra.run.dir={run}"]
    command += [f"paths.cache_dir={cache}", *QUIET, *STOP_ONLY, *overrides]
    return finish(subprocess.Popen(command, **BACKGROUND))


# In a session of its own, so that a hung job and the processes it started are all killed.
BACKGROUND = dict(cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(process: subprocess.Popen, limit: float = LIMIT) -> subprocess.CompletedProcess:
    """Wait for ``process`` for ``limit`` seconds; a job still running then hung: killed, and a failure."""
    try:
        stdout, stderr = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"the job hung: still running after {limit} s\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def raise_at(step: int, rank: int, error: str = "OutOfMemoryError") -> list[str]:
    return [
        "+callbacks.fail._target_=tests.fault_callbacks.RaiseInTrainingStep",
        f"+callbacks.fail.step={step}", f"+callbacks.fail.rank={rank}", f"+callbacks.fail.error={error}",
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("rank", "error"), [(0, "OutOfMemoryError"), (1, "OutOfMemoryError"), (1, "KeyboardInterrupt")]
)
def test_an_error_on_one_rank_ends_the_job_and_leaves_no_corrupt_checkpoint(tmp_path, rank, error):
    """An out-of-memory error (or a Ctrl-C that reaches one process) inside ``training_step`` of one of 2
    gloo processes at step 6, while the other waits in the step's all-reduce: the job exits non-zero in
    bounded time (before, the failing process saved last.ckpt with a barrier that met the other's
    all-reduce, and both hung). A last.ckpt, where one is left, is whole and holds step 6: the steps
    every process finished, saved by the first process alone."""
    run = tmp_path / "run"
    result = train_two_ranks(run, tmp_path / "cache", "trainer.max_steps=100000", *raise_at(6, rank, error))
    assert result.returncode != 0, result.stderr[-3000:]
    assert error in result.stdout + result.stderr
    last = run / "checkpoints" / "last.ckpt"
    if rank == 0:  # the first process saves what every process finished, with no collective
        said = re.search(
            r"Stopped by an error \(OutOfMemoryError\) at step (\d+), epoch \d+: saved (\S+);", result.stdout
        )
        assert said and int(said[1]) == 6 and Path(said[2]) == last, result.stdout[-3000:]
    if last.exists():
        step, scheduler_steps, _ = checkpoint_state(last)
        assert step == scheduler_steps == 6
        assert torch.load(last, map_location="cpu", weights_only=False)["loops"]


def slurm_job(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The environment of a one-node SLURM job (job 4242) whose ``scontrol`` only writes its arguments to
    the returned file."""
    bin_dir, requeues = tmp_path / "bin", tmp_path / "requeues.txt"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {requeues}\n')
    (bin_dir / "scontrol").chmod(0o755)
    job = {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost", "MASTER_ADDR": "127.0.0.1", "PATH": f"{bin_dir}:{os.environ['PATH']}",
    }  # fmt: skip
    return {**os.environ, **job}, requeues


def start_tasks(job: dict[str, str], out: Path, *args: str, tasks: int = 2) -> list[subprocess.Popen]:
    """``python train.py ARGS`` once per task of ``job``, with the variables ``srun`` gives each task;
    each task's output goes to ``out``.taskN."""
    with socket.socket() as probe:  # a free port for the process group's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    started = []
    for rank in range(tasks):
        env = {**job, "SLURM_NTASKS": str(tasks), "SLURM_NTASKS_PER_NODE": str(tasks), "MASTER_PORT": port}
        env.update(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank))
        with open(f"{out}.task{rank}", "w") as output:
            command = [sys.executable, "train.py", *args]
            started.append(
                subprocess.Popen(
                    command,
                    cwd=REPO,
                    env=env,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    return started


def output(out: Path, rank: int) -> str:
    return Path(f"{out}.task{rank}").read_text()


def wait_for(condition, what: str, tasks: list[subprocess.Popen], timeout: float = 90) -> None:
    """Poll ``condition`` until it holds; the tasks are killed and the test fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            kill(tasks)
            pytest.fail(f"{what}: not after {timeout} s")
        time.sleep(0.2)


def kill(tasks: list[subprocess.Popen]) -> None:
    for task in tasks:
        if task.poll() is None:
            os.killpg(task.pid, signal.SIGKILL)
        task.wait()


def finish_tasks(tasks: list[subprocess.Popen], timeout: float = LIMIT) -> list[int]:
    """The tasks' exit statuses; tasks still running after ``timeout`` hung: killed, and a failure."""
    deadline = time.monotonic() + timeout
    for task in tasks:
        try:
            task.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            kill(tasks)
            pytest.fail(f"the job hung: a task still ran after {timeout} s")
    return [task.returncode for task in tasks]


def last_step(out: Path) -> int:
    """The last step that the first task's progress lines report (0 before the first)."""
    steps = re.findall(r"\] - step (\d+) \| epoch", output(out, 0))
    return int(steps[-1]) if steps else 0


@pytest.mark.slow
def test_slurm_requeue_signal_on_two_ranks_saves_at_a_batch_start_and_resumes_exactly(tmp_path):
    """SIGUSR1 reaches the second of 2 tasks of a SLURM job (the signal reaches the tasks at different
    moments of their steps; here the other not at all): the handler only notes it; at the next logging
    step both tasks save ``hpc_ckpt_1.ckpt`` at the same batch's start and the first calls ``scontrol
    requeue`` once. Before, the second task saved inside its handler, whose barrier met the first's
    all-reduce: the job hung and no HPC checkpoint was written. Killed later (SLURM's time limit), the
    requeued job resumes from the HPC checkpoint and trains, on each rank, the batches at the learning
    rates of a job never stopped."""
    job, requeues = slurm_job(tmp_path)
    every = 5
    common = ["experiment=smoke", "trainer=ddp_cpu", f"paths.cache_dir={tmp_path / 'cache'}", *QUIET]
    common += [
        *STOP_ONLY,
        "trainer.max_steps=400",
        f"trainer.log_every_n_steps={every}",
        "evaluate.test=false",
    ]
    run, out = tmp_path / "slurm-4242", tmp_path / "job"
    tasks = start_tasks(job, out, *common, f"hydra.run.dir={run}")
    wait_for(lambda: last_step(out) >= 3, "progress to step 3", tasks)
    tasks[1].send_signal(signal.SIGUSR1)
    hpc, said = run / "hpc_ckpt_1.ckpt", re.compile(r"Saved (\S+) at step (\d+)")
    wait_for(lambda: all(said.search(output(out, rank)) for rank in (0, 1)), "a save on both tasks", tasks)
    saved = [said.findall(output(out, rank)) for rank in (0, 1)]
    assert saved[0] == saved[1] == [(str(hpc), saved[0][0][1])]
    step = int(saved[0][0][1])
    assert (step + 1) % every == 0  # agreed on before the batch of a logging step
    assert checkpoint_state(hpc)[0] == step
    wait_for(lambda: last_step(out) >= step + 3, "training going on", tasks)
    assert requeues.read_text() == "requeue 4242\n"
    kill(tasks)  # SLURM's time limit: no time to save again

    stop = ["+callbacks.stop._target_=tests.fault_callbacks.StopAtStep", f"+callbacks.stop.step={step + 4}"]
    again = tmp_path / "requeued"
    requeued = start_tasks(job, again, *common, f"hydra.run.dir={run}", *stop, *record(tmp_path / "r"))
    assert finish_tasks(requeued) == [0, 0], output(again, 0)[-3000:]
    assert f"Requeued SLURM job: resuming from {hpc}" in output(again, 0)
    never = tmp_path / "straight"
    straight = start_tasks(job, never, *common, f"hydra.run.dir={never}", *stop, *record(tmp_path / "s"))
    assert finish_tasks(straight) == [0, 0], output(never, 0)[-3000:]
    for rank in (0, 1):
        resumed = [(r["step"], r["indices"], r["lr"]) for r in read_records(tmp_path / "r", rank)]
        expected = [(r["step"], r["indices"], r["lr"]) for r in read_records(tmp_path / "s", rank)][step:]
        assert [s for s, _, _ in resumed] == list(range(step, step + 4)), rank
        assert resumed == expected, rank
