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
import threading
import time
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from seq2seq.data.prepared import cache as cache_module
from seq2seq.data.prepared.build import write_manifest
from seq2seq.data.prepared.cache import cache_key
from seq2seq.errors import UserError
from seq2seq.slurm import newest_checkpoint
from tests.fault_callbacks import read_records
from tests.test_distributed import STOP_ONLY, checkpoint_state, record
from tests.test_prepared import FILES, toy_files
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


@pytest.mark.slow
def test_ctrl_c_to_every_rank_ends_the_job_and_leaves_a_whole_checkpoint(tmp_path):
    """Ctrl-C in a terminal reaches both processes of a 2-process job, each wherever it is in its step
    (one in the all-reduce, one between steps): the job exits 130 in bounded time, and last.ckpt holds
    a step every process finished (before, the processes' saves with a barrier could meet the other's
    all-reduce: 2 of 3 tries hung here)."""
    run, out = tmp_path / "run", tmp_path / "out.txt"
    command = [sys.executable, "train.py", "experiment=smoke", "trainer=ddp_cpu", f"hydra.run.dir={run}"]
    command += [f"paths.cache_dir={tmp_path / 'cache'}", *QUIET, *STOP_ONLY, "trainer.max_steps=100000"]
    with open(out, "w") as output:
        job = subprocess.Popen(
            command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
    wait_for(lambda: re.search(r"\] - step [3-9] \| epoch", out.read_text()), "progress to step 3", [job])
    os.killpg(job.pid, signal.SIGINT)  # the terminal's process group
    assert finish_tasks([job], timeout=90) == [130], out.read_text()[-3000:]
    said = re.search(
        r"Interrupted by Ctrl-C \(SIGINT\) at step (\d+), epoch \d+: saved (\S+);", out.read_text()
    )
    assert said and Path(said[2]) == run / "checkpoints" / "last.ckpt"
    assert checkpoint_state(Path(said[2]))[:2] == (int(said[1]), int(said[1]))


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


def start_tasks(
    job: dict[str, str], out: Path, *args: str, tasks: int = 2, ranks: list[int] | None = None
) -> list[subprocess.Popen]:
    """``python train.py ARGS`` once per task of ``job`` (or only those of ``ranks``), with the variables
    ``srun`` gives each task; each task's output goes to ``out``.taskN."""
    with socket.socket() as probe:  # a free port for the process group's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    started = []
    for rank in range(tasks) if ranks is None else ranks:
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


def test_a_requeued_job_resumes_the_checkpoint_of_the_latest_step_whatever_the_file_times(tmp_path):
    """Every task chooses before they can agree, so by what the files hold: a node's network file system
    can show stale modification times (here: made older or newer by hand, against their steps)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert newest_checkpoint(run) is None
    saved = {"hpc_ckpt_1.ckpt": 40, "hpc_ckpt_2.ckpt": 80, "checkpoints/last.ckpt": 60}
    for seconds, (name, step) in enumerate(saved.items()):
        torch.save({"global_step": step}, run / name)
        os.utime(run / name, (1e9 - seconds * 100, 1e9 - seconds * 100))  # the later step, the older file
    assert newest_checkpoint(run) == run / "hpc_ckpt_2.ckpt"
    torch.save({"global_step": 80}, run / "checkpoints" / "last.ckpt")  # stopped right after that save
    assert newest_checkpoint(run) == run / "checkpoints" / "last.ckpt"
    (run / "checkpoints" / "last.ckpt").unlink()
    torch.save({"global_step": 80}, run / "hpc_ckpt_3.ckpt")
    assert newest_checkpoint(run) == run / "hpc_ckpt_3.ckpt"


@pytest.mark.slow
@pytest.mark.parametrize("tasks", [1, 2])
def test_slurm_requeue_signal_saves_at_a_batch_start_and_resumes_exactly(tmp_path, tasks):
    """SLURM's SIGUSR1 reaches the last task of a job of 1 or 2 tasks: the handler only notes it; before
    the next batch (with 2 tasks: of a logging step) every task saves ``hpc_ckpt_1.ckpt`` at the same
    batch's start and the first calls ``scontrol requeue`` once. Killed later (SLURM's time limit), the
    requeued job resumes from the HPC checkpoint and trains, on each rank, the batches at the learning
    rates of a job never stopped. Before, each task saved inside its handler, wherever it was. With 2
    tasks the signal goes to the second only (it reaches tasks at different moments of their steps):
    its save's barrier met the first's all-reduce and the job hung, no HPC checkpoint written. With 1,
    it comes right after a batch's optimizer step, before the batch is counted: the checkpoint counted
    it as untrained, and the requeued job trained it again. The second task saves its logs 2 s later than
    the first: before, it then found the first's ``hpc_ckpt_1.ckpt`` already written and named its own
    save ``hpc_ckpt_2.ckpt`` (each task numbered the checkpoint from the files it saw)."""
    job, requeues = slurm_job(tmp_path)
    every, ranks = 5, range(tasks)
    common = ["experiment=smoke", f"paths.cache_dir={tmp_path / 'cache'}", *QUIET, *STOP_ONLY]
    common += ["trainer.max_steps=400", f"trainer.log_every_n_steps={every}", "evaluate.test=false"]
    common += ["trainer=ddp_cpu"] if tasks == 2 else []
    slow_second = ["+logger.slow._target_=tests.fault_callbacks.SlowToSaveLogs", "+logger.slow.rank=1"]
    slow_second += ["+logger.slow.seconds=2"]
    run, out = tmp_path / "slurm-4242", tmp_path / "job"
    after_step = ["+callbacks.usr1._target_=tests.fault_callbacks.SignalAfterStep", "+callbacks.usr1.step=3"]
    signal_or_delay = after_step if tasks == 1 else slow_second
    started = start_tasks(job, out, *common, f"hydra.run.dir={run}", *signal_or_delay, tasks=tasks)
    wait_for(lambda: last_step(out) >= 3, "progress to step 3", started)
    if tasks == 2:
        started[-1].send_signal(signal.SIGUSR1)
    hpc, said = run / "hpc_ckpt_1.ckpt", re.compile(r"Saved (\S+) at step (\d+)")
    wait_for(lambda: all(said.search(output(out, rank)) for rank in ranks), "a save on every task", started)
    saved = [said.findall(output(out, rank)) for rank in ranks]
    step = int(saved[0][0][1])
    assert all(found == [(str(hpc), str(step))] for found in saved), saved
    assert tasks == 1 or (step + 1) % every == 0  # agreed on before the batch of a logging step
    assert checkpoint_state(hpc)[0] == step
    wait_for(lambda: last_step(out) >= step + 3, "training going on", started)
    assert requeues.read_text() == "requeue 4242\n"
    kill(started)  # SLURM's time limit: no time to save again

    stop = ["+callbacks.stop._target_=tests.fault_callbacks.StopAtStep", f"+callbacks.stop.step={step + 4}"]
    again, never = tmp_path / "requeued", tmp_path / "straight"
    requeued = start_tasks(
        job, again, *common, f"hydra.run.dir={run}", *stop, *record(tmp_path / "r"), tasks=tasks
    )
    assert finish_tasks(requeued) == [0] * tasks, output(again, 0)[-3000:]
    assert f"Requeued SLURM job: resuming from {hpc}" in output(again, 0)
    straight = start_tasks(
        job, never, *common, f"hydra.run.dir={never}", *stop, *record(tmp_path / "s"), tasks=tasks
    )
    assert finish_tasks(straight) == [0] * tasks, output(never, 0)[-3000:]
    for rank in ranks:
        resumed = [(r["step"], r["indices"], r["lr"]) for r in read_records(tmp_path / "r", rank)]
        expected = [(r["step"], r["indices"], r["lr"]) for r in read_records(tmp_path / "s", rank)][step:]
        assert [s for s, _, _ in resumed] == list(range(step, step + 4)), rank
        assert resumed == expected, rank


@pytest.mark.slow
def test_a_rank_waiting_for_the_data_gives_up_when_the_preparer_fails(tmp_path):
    """2 tasks of a SLURM job on a corpus with a bad line in the training file (found only by the task
    that prepares, which streams it): the preparer fails with the line's error, and the other task,
    which waits for the prepared data, gives up in seconds with one line naming the preparer's host
    and pid and its error (at first, it checked the cache once a second until the job's time limit).
    The second task starts only once the first has failed, as a task of a job may start seconds after
    another: before, it took that failure for an earlier run's and waited 5 minutes (a CI run under
    load timed out so)."""
    job, _ = slurm_job(tmp_path)
    corpus = toy_files(tmp_path)
    train_src = Path(corpus[0].split("=", 1)[1])
    lines = train_src.read_bytes().split(b"\n")
    lines[200] = b"broken \xff here"
    train_src.write_bytes(b"\n".join(lines))
    out = tmp_path / "job"
    args = ["trainer=ddp_cpu", *FILES, *corpus, f"hydra.run.dir={tmp_path / 'run'}", *QUIET]
    args += [f"paths.cache_dir={tmp_path / 'cache'}"]
    (preparer,) = start_tasks(job, out, *args, ranks=[0])
    assert finish_tasks([preparer], timeout=90) == [2], output(out, 0)[-3000:]
    (waiter,) = start_tasks(job, out, *args, ranks=[1])
    assert finish_tasks([waiter], timeout=90) == [2], output(out, 1)[-3000:]
    tasks = [preparer, waiter]
    assert "line 201: invalid UTF-8" in output(out, 0)
    waiter = [line for line in output(out, 1).splitlines() if line.startswith("error: ")]
    preparer_pid = tasks[0].pid
    assert len(waiter) == 1 and f"pid {preparer_pid})" in waiter[0], output(out, 1)[-3000:]
    assert f"local rank 0 of node 0 (host {socket.gethostname()}, pid {preparer_pid})" in waiter[0]
    assert "line 201: invalid UTF-8" in waiter[0]


def waiting_datamodule(compose_config, tmp_path, monkeypatch, *overrides: str):
    """The data module of a process that waits for local rank 0 to prepare data=files, and the path of
    a claim of that preparation by a process ``host-pid``."""
    corpus = toy_files(tmp_path)
    monkeypatch.setenv("LOCAL_RANK", "1")
    datamodule = instantiate(compose_config(*FILES, *corpus, *overrides).data)
    assert not datamodule.prepares_here()
    root = Path(datamodule.cache_dir) / "prepared"
    root.mkdir(parents=True)
    corpus, settings, max_len, _, tokenizer = datamodule._what_names_the_cache()
    key = cache_key(corpus, settings, max_len, tokenizer)
    return datamodule, lambda owner: root / f"{key}.preparer-{owner}.json"


def test_a_preparer_on_another_host_whose_heartbeat_stops_is_given_up_on(
    compose_config, tmp_path, monkeypatch
):
    """A preparer on another host cannot be checked by its pid: its claim's heartbeat (mtime) is. Seen
    alive, then silent for CLAIM_STALE_SECONDS: the waiting process gives up, naming it."""
    monkeypatch.setattr(cache_module, "CLAIM_STALE_SECONDS", 3)
    datamodule, claim = waiting_datamodule(compose_config, tmp_path, monkeypatch)
    write_manifest(claim("node-7.cluster-4242"), {"host": "node-7.cluster", "pid": 4242})
    started = time.monotonic()
    message = r"^local rank 0 of node 0 \(host node-7.cluster, pid 4242\) stopped preparing "
    message += r".* without finishing it \(no heartbeat for \d s\)"
    with pytest.raises(UserError, match=message):
        datamodule.setup("fit")
    assert 3 <= time.monotonic() - started < 10


def test_a_preparer_on_this_host_whose_process_ends_is_given_up_on(compose_config, tmp_path, monkeypatch):
    """On the preparer's own host its pid tells: killed (no chance to mark its claim failed) while the
    other process waits, it is given up on within a second or two."""
    datamodule, claim = waiting_datamodule(compose_config, tmp_path, monkeypatch)
    preparer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    write_manifest(
        claim(f"{socket.gethostname()}-{preparer.pid}"), {"host": socket.gethostname(), "pid": preparer.pid}
    )
    threading.Timer(2, lambda: (preparer.kill(), preparer.wait())).start()
    started = time.monotonic()
    with pytest.raises(
        UserError, match=rf"pid {preparer.pid}\) stopped preparing .* \(its process is gone\)"
    ):
        datamodule.setup("fit")
    assert 2 <= time.monotonic() - started < 8


def test_waiting_for_a_live_preparer_ends_at_data_prepare_wait_seconds(compose_config, tmp_path, monkeypatch):
    """A preparer alive (on another host, its heartbeat going on) but not done: the wait ends after
    data.prepare_wait_seconds, with a line naming the option."""
    datamodule, claim = waiting_datamodule(
        compose_config, tmp_path, monkeypatch, "data.prepare_wait_seconds=3"
    )
    path = claim("node-7.cluster-4242")
    write_manifest(path, {"host": "node-7.cluster", "pid": 4242})
    beating = threading.Event()

    def beat() -> None:
        while not beating.wait(0.5):
            os.utime(path)

    threading.Thread(target=beat, daemon=True).start()
    started = time.monotonic()
    message = r"^Gave up waiting for local rank 0 of node 0 \(host node-7.cluster, pid 4242\) to prepare "
    message += r".* after 3 s \(data.prepare_wait_seconds\)"
    try:
        with pytest.raises(UserError, match=message):
            datamodule.setup("fit")
    finally:
        beating.set()
    assert 3 <= time.monotonic() - started < 10


def test_no_preparer_at_all_is_given_up_on(compose_config, tmp_path, monkeypatch):
    """Nobody claims the preparation (the preparer failed before reaching the cache, or prepares into
    another node's cache folder): the waiting process gives up after NO_PREPARER_SECONDS; a claim left
    by a preparer that stopped before this process started (an earlier job's) is no one's."""
    monkeypatch.setattr(cache_module, "NO_PREPARER_SECONDS", 3)
    datamodule, claim = waiting_datamodule(compose_config, tmp_path, monkeypatch)
    old = claim(f"{socket.gethostname()}-{2**22 + 1}")  # above pid_max: no such process
    write_manifest(old, {"host": socket.gethostname(), "pid": 2**22 + 1, "failed": "an earlier job's"})
    os.utime(old, (cache_module.PROCESS_STARTED - 60, cache_module.PROCESS_STARTED - 60))
    with pytest.raises(
        UserError, match=r"^No process has been preparing .* for \d s: local rank 0 of node 0 failed"
    ):
        datamodule.setup("fit")


def test_data_prepare_wait_seconds_must_be_positive(compose_config):
    with pytest.raises(InstantiationException) as caught:
        instantiate(compose_config("data.prepare_wait_seconds=0").data)
    cause = caught.value.__cause__
    assert isinstance(cause, UserError)
    assert str(cause) == "data.prepare_wait_seconds must be a number of seconds > 0 or null, got 0"
