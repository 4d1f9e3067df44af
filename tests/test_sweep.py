"""Hydra multirun sweeps on the smoke experiment: a grid, a failing trial, and searches with our sweeper
(hydra/sweeper=seq2seq): asynchronous workers, pruning, a killed worker, journal and PostgreSQL storages."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from .test_training import QUIET, REPO, run_script

pytestmark = pytest.mark.slow


def sweep(tmp_path: Path, *overrides: str):
    result = run_script(
        "train.py", "--multirun", "experiment=smoke", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"paths.cache_dir={tmp_path / 'cache'}", *QUIET, *overrides,
    )  # fmt: skip
    summary = tmp_path / "sweep" / "summary.csv"
    rows = list(csv.DictReader(summary.open())) if summary.exists() else []
    return result, rows


@pytest.mark.slow
def test_grid_sweep_writes_a_summary_best_first(tmp_path):
    result, rows = sweep(tmp_path, "model.dropout=0.0,0.2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(rows) == 2 and {r["status"] for r in rows} == {"ok"}
    # Only the swept value, not the constant overrides of every trial (experiment=smoke, paths, ...).
    assert sorted(r["dropout"] for r in rows) == ["0.0", "0.2"] and "experiment" not in rows[0]
    bleus = [float(r["val_bleu"]) for r in rows]
    assert bleus == sorted(bleus, reverse=True)
    for row in rows:
        assert (
            Path(row["checkpoint"]).is_file()
            and int(row["parameters"]) > 0
            and float(row["train_minutes"]) > 0
            and 0 <= float(row["test_bleu"]) <= 100
            and int(row["steps"]) == 60  # experiment=smoke: max_steps
            and float(row["tokens_per_second"]) > 0
        )
    assert "Sweep summary" in result.stdout and "tokens/s" in result.stdout


@pytest.mark.slow
def test_a_failing_trial_is_recorded_and_the_others_complete(tmp_path):
    result, rows = sweep(tmp_path, "model.hidden_size=-1,128")
    assert len(rows) == 2
    ok, failed = rows
    assert ok["status"] == "ok" and ok["hidden_size"] == "128" and float(ok["val_bleu"]) >= 0
    assert failed["status"] == "failed" and failed["hidden_size"] == "-1"
    assert "model.hidden_size must be positive" in failed["error"]
    # Hydra's grid sweeper reports the failure once every trial has run: a user's mistake, in one line.
    assert result.returncode == 2 and "error: " in result.stderr and "Traceback" not in result.stderr


def study_of(sweep_dir: Path, name: str, storage: str | None = None):
    """The study as another process reads it while the sweep writes it."""
    from seq2seq.trial import JOURNAL_FILE, StudySpec

    spec = StudySpec(storage=storage or str(sweep_dir / JOURNAL_FILE), name=name, direction="maximize")
    return pytest.importorskip("optuna").load_study(study_name=name, storage=spec.open_storage())


def states(study) -> list[str]:
    return [t.state.name for t in study.trials]


@pytest.mark.slow
def test_pruning_search_two_workers_without_barrier(tmp_path):
    """conf/hparams_search/smoke_pruning.yaml as shipped: the first sweep a user runs."""
    pytest.importorskip("optuna")
    result, rows = sweep(tmp_path, "hparams_search=smoke_pruning")
    assert result.returncode == 0, result.stderr[-3000:]
    study = study_of(tmp_path / "sweep", "smoke_pruning")
    assert len(study.trials) == 6 and "PRUNED" in states(study) and "COMPLETE" in states(study)
    # The baseline (the smoke recipe as it is) is trial 0.
    assert (
        study.trials[0].params == {"module.optimizer.lr": 0.01} and study.trials[0].state.name == "COMPLETE"
    )
    # The hopeless learning rate stops at its first or second validation (every 30 steps).
    for trial in study.trials:
        if trial.params["module.optimizer.lr"] == 1e-7:
            assert trial.state.name == "PRUNED" and max(trial.intermediate_values) <= 60
    # Two workers, each taking its next trial as its last one ends: trials overlap in time, and
    # the trials that ended early (pruned) did not wait for a longer one to end.
    spans = sorted((t.datetime_start, t.datetime_complete) for t in study.trials)
    assert any(start < spans[i][1] for i, (_, _) in enumerate(spans) for start, _ in spans[i + 1 :])
    workers = {t.user_attrs["host_pid"] for t in study.trials}
    assert len(workers) == 2
    # summary.csv: every trial, complete ones first; pruned ones with their last step and validations.
    assert len(rows) == 6 and [r["status"] for r in rows] == sorted(
        (r["status"] for r in rows), key=["ok", "pruned"].index
    )
    pruned = [r for r in rows if r["status"] == "pruned"]
    assert all(
        int(r["steps"]) < 120 and r["validations"].split()[-1].startswith(r["steps"] + ":") for r in pruned
    )
    assert all(Path(r["checkpoint"]).is_file() for r in rows)  # a pruned trial keeps its best checkpoint
    assert {r["lr"] for r in rows} <= {"1e-07", "0.001", "0.003", "0.01", "0.03"}
    for plot in ("optimization_history", "intermediate_values", "param_importances"):
        assert (tmp_path / "sweep" / f"{plot}.html").stat().st_size > 0
        assert (tmp_path / "sweep" / f"{plot}.png").stat().st_size > 0
    assert (
        "Sweep summary" in result.stdout
        and max(len(line) for line in result.stdout.splitlines()[-14:]) <= 120
    )


def test_pruning_on_seconds_without_a_time_budget_is_a_one_line_error(tmp_path):
    pytest.importorskip("optuna")
    result, _ = sweep(
        tmp_path,
        "hparams_search=bible_recipe_halving",
        "hydra.sweeper.fixed_points=[]",
        "trainer.max_time=null",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "prune_on=seconds: the trials have no time budget (set trainer.max_time)" in result.stderr


@pytest.mark.parametrize(
    "search_name, pruner_overrides",
    [
        ("bible_recipe_halving", ["hydra.sweeper.pruner.min_resource=1"]),
        ("attn_recipe_halving", ["hydra.sweeper.pruner.min_resource=1"]),
        (
            "bible_recipe_hyperband",
            ["hydra.sweeper.pruner.min_resource=1", "hydra.sweeper.pruner.max_resource=300"],
        ),
    ],
)
def test_the_pruned_recipe_searches_report_training_seconds(tmp_path, search_name, pruner_overrides):
    """conf/hparams_search/{bible,attn}_recipe_halving.yaml and bible_recipe_hyperband.yaml, shrunk to the
    toy task: their trials report where they are in seconds of training (hydra.sweeper.prune_on=seconds),
    so the pruner's rungs compare them at equal time; result.json still lists the validations by step."""
    pytest.importorskip("optuna")
    # no baseline: the smoke experiment's tiny model is outside the search space
    search = [f"hparams_search={search_name}", "hydra.sweeper.n_trials=2", "hydra.sweeper.fixed_points=[]"]
    result, rows = sweep(
        tmp_path, *search, "trainer.max_time=00:00:05:00", "trainer.max_steps=20",
        "trainer.val_check_interval=10", "hydra.sweeper.plots=false", *pruner_overrides,
        # the toy corpus's own subwords: it has too few pieces for the searched vocabularies
        "data.subword.vocab_size=32", "data.subword.model_type=word",
        # toy sizes: one value on the command line takes a key out of the search
        "model.embed_size=32", "model.hidden_size=64", "data.batch_tokens=640",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    trials = study_of(tmp_path / "sweep", search_name).trials
    assert len(trials) == len(rows) == 2
    assert all("model.hidden_size" not in t.params and "module.optimizer.lr" in t.params for t in trials)
    assert "hidden_size" not in rows[0] and "lr" in rows[0]  # summary.csv: a column per key searched
    for trial in trials:
        (row,) = [r for r in rows if int(r["trial"]) == trial.number]
        steps = [int(v.split(":")[0]) for v in row["validations"].split()]
        seconds = sorted(trial.intermediate_values)
        assert steps and all(step % 10 == 0 for step in steps)
        assert seconds and seconds != steps and seconds[-1] <= float(row["train_minutes"]) * 60 + 1


def smoke_search(tmp_path: Path, *overrides: str) -> list[str]:
    """The command of a smoke_pruning search in ``tmp_path/sweep``, without pruning or plots."""
    return [
        sys.executable, "train.py", "hparams_search=smoke_pruning", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"paths.cache_dir={tmp_path / 'cache'}", *QUIET, "hydra.sweeper.pruner=null",
        "hydra.sweeper.plots=false", *overrides,
    ]  # fmt: skip


# The killed-worker tests: 3 trials of 60 steps, the baseline first.
THREE_TRIALS = [
    "hydra.sweeper.n_trials=3", "trainer.max_steps=60", "module.optimizer.lr=choice(0.01,0.03)",
    "hydra.sweeper.fixed_points=[{}]",
]  # fmt: skip


# A dead worker's trial is failed by the sweep's own process (the worker ended badly) or by another
# worker that finds its process gone, whichever looks first.
DEAD_WORKER = re.compile(r"its worker \(.+\) (stopped during the trial|is gone)")


def running_trials(sweep_dir: Path, sweep: subprocess.Popen, enough: Callable[[list], bool]) -> list:
    """The study's running trials once ``enough`` holds for them (or after 180 s, or when the sweep
    ends), read from the journal in this process while the sweep writes it."""
    deadline = time.monotonic() + 180
    running = []
    while time.monotonic() < deadline and sweep.poll() is None:
        if (sweep_dir / "optuna.journal").exists():
            running = [t for t in study_of(sweep_dir, "smoke_pruning").trials if t.state.name == "RUNNING"]
        if enough(running):
            break
        time.sleep(0.5)
    return running


def a_trial_mid_training(sweep_dir: Path, sweep: subprocess.Popen):
    """A running trial that has reported a validation."""
    running = running_trials(sweep_dir, sweep, lambda trials: any(t.intermediate_values for t in trials))
    return next(t for t in running if t.intermediate_values)


def summary_statuses(sweep_dir: Path) -> dict[int, str]:
    """Each trial's status in the sweep's summary.csv."""
    return {int(row["trial"]): row["status"] for row in csv.DictReader((sweep_dir / "summary.csv").open())}


def kill_a_worker_mid_trial(sweep_dir: Path, sweep: subprocess.Popen):
    """SIGKILL the worker of a trial mid-training; returns that trial once the sweep has marked it ended."""
    victim = a_trial_mid_training(sweep_dir, sweep)
    os.kill(int(victim.user_attrs["host_pid"].rpartition(":")[2]), signal.SIGKILL)
    while study_of(sweep_dir, "smoke_pruning").trials[victim.number].state.name == "RUNNING":
        time.sleep(0.5)  # the sweep fails that trial at once; the other worker goes on
    return victim


@pytest.mark.slow
def test_a_killed_worker_fails_its_trial_and_the_same_command_finishes_the_study(tmp_path):
    pytest.importorskip("optuna")
    sweep_dir = tmp_path / "sweep"
    command = smoke_search(tmp_path, *THREE_TRIALS)
    first = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        victim = kill_a_worker_mid_trial(sweep_dir, first)
        assert first.poll() is None
        os.killpg(first.pid, signal.SIGKILL)  # then the whole command, mid-trial
        first.wait()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    study = study_of(sweep_dir, "smoke_pruning")
    assert study.trials[victim.number].state.name == "FAIL"
    assert DEAD_WORKER.fullmatch(study.trials[victim.number].user_attrs["error"])
    # The same command again: the trial left running by the killed command is failed, the study ends
    # with 3 complete trials and no running one, the baseline was not queued a second time.
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    study = study_of(sweep_dir, "smoke_pruning")
    assert (
        states(study).count("COMPLETE") == 3
        and "RUNNING" not in states(study)
        and "WAITING" not in states(study)
    )
    assert sum("fixed_point" in t.user_attrs for t in study.trials) == 1
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(rows) == len(study.trials) and len(failed) == states(study).count("FAIL") >= 1
    assert all(r["lr"] for r in failed) and any(DEAD_WORKER.fullmatch(r["error"]) for r in failed)


@pytest.mark.slow
def test_a_trial_stopped_before_its_run_began_is_recorded_as_interrupted(tmp_path):
    """Ctrl-C can reach a worker while Hydra is still starting a trial's job, before the run could write
    its result.json: the worker records the trial as interrupted (in the study and in summary.csv) and
    queues it again, as for a trial stopped mid-training."""
    pytest.importorskip("optuna")
    sweep_dir = tmp_path / "sweep"
    command = smoke_search(
        tmp_path, "hydra.sweeper.workers=1", "hydra.sweeper.n_trials=2", "hydra.sweeper.retry_killed=1",
        "+hydra.callbacks.interrupt._target_=tests.fault_callbacks.InterruptJobStart",
        "+hydra.callbacks.interrupt.job=0",
    )  # fmt: skip
    subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    trials = study_of(sweep_dir, "smoke_pruning").trials
    assert trials[0].state.name == "FAIL"
    assert trials[0].user_attrs["error"] == "interrupted (KeyboardInterrupt)"
    assert summary_statuses(sweep_dir)[0] == "interrupted"
    assert [t.user_attrs.get("retry_of") for t in trials if t.state.name == "WAITING"].count(0) == 1


@pytest.mark.parametrize(
    ("stop", "group"),
    [(signal.SIGINT, True), (signal.SIGTERM, True), (signal.SIGTERM, False)],
    ids=["ctrl_c", "sigterm", "sigterm_to_the_sweep_process"],
)
@pytest.mark.slow
def test_a_stopped_search_fails_its_running_trials_and_queues_them_again(tmp_path, stop, group):
    """A long search run in pieces (docs/recipe-search.md): Ctrl-C, or SIGTERM (a job's time limit), ends a
    piece, and with retry_killed the next piece starts with the trials it interrupted, values unchanged.
    SIGTERM to the sweep's own process alone (``kill PID``) stops its workers too."""
    pytest.importorskip("optuna")
    sweep_dir = tmp_path / "sweep"
    command = smoke_search(tmp_path, "hydra.sweeper.retry_killed=1", "trainer.max_steps=600")
    log = tmp_path / "sweep.log"
    with log.open("w") as out:
        sweep = subprocess.Popen(
            command, cwd=REPO, stdout=out, stderr=out, start_new_session=True,
            # a background job of a non-interactive shell (CI) starts with SIGINT ignored
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
    try:
        a_trial_mid_training(sweep_dir, sweep)
        if group:
            os.killpg(sweep.pid, stop)  # the whole process group, as a terminal's Ctrl-C or SLURM does
        else:
            os.kill(sweep.pid, stop)
        sweep.wait(timeout=120)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    assert sweep.returncode != 0
    assert re.search(r"Study smoke_pruning: \d+ fail, \d+ waiting", log.read_text())  # where it stands
    trials = study_of(sweep_dir, "smoke_pruning").trials
    interrupted = [t for t in trials if t.state.name == "FAIL"]
    assert interrupted and not [t for t in trials if t.state.name in ("RUNNING", "COMPLETE")]
    assert all(t.user_attrs["error"].startswith("interrupted") for t in interrupted)
    summary = summary_statuses(sweep_dir)
    assert all(summary[t.number] == "interrupted" for t in interrupted)  # as the piece left them
    queued = [t for t in trials if t.state.name == "WAITING" and "retry_of" in t.user_attrs]
    assert sorted((t.user_attrs["retry_of"], t.system_attrs["fixed_params"]) for t in queued) == sorted(
        (t.number, t.params) for t in interrupted
    )
    # The next piece: each retry goes on from its interrupted attempt's last checkpoint (where it has
    # one), with that attempt's validations already reported; here each trial ends at step 90.
    checkpoints = {t.number: sweep_dir / str(t.number) / "checkpoints" / "last.ckpt" for t in interrupted}
    assert any(path.is_file() for path in checkpoints.values())  # the trial seen mid-training has one
    waiting = sum(t.state.name == "WAITING" for t in trials)  # the retries and the baselines not begun
    again = [*command, f"hydra.sweeper.n_trials={waiting}", "trainer.max_steps=90"]
    result = subprocess.run(again, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = study_of(sweep_dir, "smoke_pruning").trials
    for retry in (trials[t.number] for t in queued):
        before = trials[retry.user_attrs["retry_of"]]
        assert retry.state.name == "COMPLETE"
        if not checkpoints[before.number].is_file():
            assert "resumed_from" not in retry.user_attrs
            continue
        assert retry.user_attrs["resumed_from"] == before.number
        assert before.intermediate_values.items() <= retry.intermediate_values.items()
        assert all(step % 30 == 0 for step in retry.intermediate_values)  # validations where they were due
        step = torch.load(checkpoints[before.number], map_location="cpu", weights_only=False)["global_step"]
        # Lightning logs a training step's metrics at the steps done before it (a validation's too: one
        # interrupted at step 30 and run again logs at 29)
        logged = csv.DictReader((sweep_dir / str(retry.number) / "logs" / "metrics.csv").open())
        first_trained = next(row for row in logged if row["train_loss"])
        assert 0 < step <= int(first_trained["step"])  # no step trained again


@pytest.mark.slow
def test_workers_as_submitit_jobs_and_a_killed_job(tmp_path):
    """hydra/launcher=submitit_local: each worker is one submitit job, as on SLURM (hydra/launcher=slurm);
    a job killed mid-trial fails its trial and the other job finishes the study."""
    pytest.importorskip("optuna")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep_dir = tmp_path / "sweep"
    command = smoke_search(tmp_path, "hydra/launcher=submitit_local", *THREE_TRIALS)
    sweep = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        victim = kill_a_worker_mid_trial(sweep_dir, sweep)
        stdout, stderr = sweep.communicate(timeout=600)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    assert sweep.returncode == 0, stderr[-3000:]
    assert "Submitted 2 workers: jobs" in stderr + stdout
    study = study_of(sweep_dir, "smoke_pruning")
    assert study.trials[victim.number].state.name == "FAIL"
    assert DEAD_WORKER.fullmatch(study.trials[victim.number].user_attrs["error"])
    assert states(study).count("COMPLETE") == 3 and "RUNNING" not in states(study)
    assert len({t.user_attrs["host_pid"] for t in study.trials}) == 2  # one process per job
    assert len(list((sweep_dir / ".submitit").glob("*/*_log.out"))) == 2


def test_a_stop_before_training_leaves_no_trial_running(tmp_path):
    """SIGTERM to the command while both workers set their trials up (no training yet, so no Lightning
    handler): the workers end at once, and the sweep records their trials as interrupted and queues them
    again; it had left them running."""
    pytest.importorskip("optuna")
    sweep_dir = tmp_path / "sweep"
    slow = ["+callbacks.slow._target_=tests.fault_callbacks.SlowToBuild", "+callbacks.slow.seconds=600"]
    command = smoke_search(tmp_path, "hydra.sweeper.retry_killed=1", *slow)
    sweep = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        running_trials(sweep_dir, sweep, lambda trials: len(trials) == 2)
        os.killpg(sweep.pid, signal.SIGTERM)
        sweep.wait(timeout=120)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    assert sweep.returncode != 0
    trials = study_of(sweep_dir, "smoke_pruning").trials
    stopped = [t for t in trials if t.state.name == "FAIL"]
    assert len(stopped) == 2 and "RUNNING" not in [t.state.name for t in trials]
    assert all(t.user_attrs["error"].startswith("interrupted (its worker") for t in stopped)
    summary = summary_statuses(sweep_dir)
    assert all(summary[t.number] == "interrupted" for t in stopped)
    retries = [
        t.user_attrs["retry_of"] for t in trials if t.state.name == "WAITING" and "retry_of" in t.user_attrs
    ]
    assert sorted(retries) == sorted(t.number for t in stopped)


def gpu_search(tmp_path: Path, visible: str | None, *overrides: str) -> subprocess.CompletedProcess:
    """A smoke_pruning search of 2 trials on 2 local workers whose trials record their environment
    (``tmp_path/jobs.jsonl``), run with ``CUDA_VISIBLE_DEVICES=visible`` (None: unset)."""
    env = {key: value for key, value in os.environ.items() if key != "CUDA_VISIBLE_DEVICES"}
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    command = smoke_search(
        tmp_path, "hydra.sweeper.n_trials=2", "hydra.sweeper.max_failed_trials=2", "trainer.max_steps=10",
        "+hydra.callbacks.record._target_=tests.fault_callbacks.RecordJobEnvironment",
        f"+hydra.callbacks.record.path={tmp_path / 'jobs.jsonl'}", "+hydra.callbacks.record.seconds=3",
        *overrides,
    )  # fmt: skip
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["trainer.accelerator=gpu", "trainer.devices=2"], ["5,7", "GPU-1a2b,3"]),
        (["trainer=gpu"], ["5", "7"]),
        ([], ["5,7,GPU-1a2b,3", "5,7,GPU-1a2b,3"]),  # a CPU sweep: the variable as it was
    ],
    ids=["two_gpus_each", "trainer_gpu", "cpu"],
)
def test_each_local_worker_owns_its_share_of_the_visible_gpus(tmp_path, overrides, expected):
    """Workers whose trials train on GPUs (trainer.accelerator=gpu) each see their own trainer.devices
    of the GPUs the sweep sees (CUDA_VISIBLE_DEVICES here; fake ids: the trials themselves fail on this
    machine without a GPU, after recording what they saw)."""
    pytest.importorskip("optuna")
    result = gpu_search(tmp_path, "5,7,GPU-1a2b,3", *overrides)
    records = [json.loads(line) for line in (tmp_path / "jobs.jsonl").read_text().splitlines()]
    seen = {record["pid"]: record["CUDA_VISIBLE_DEVICES"] for record in records}
    assert sorted(seen.values()) == expected, result.stderr[-3000:]


@pytest.mark.parametrize("visible", ["5", ""])
def test_fewer_gpus_than_workers_asking_for_them_is_a_one_line_error(tmp_path, visible):
    pytest.importorskip("optuna")
    result = gpu_search(tmp_path, visible, "trainer.accelerator=gpu")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: hydra.sweeper.workers=2 with trainer.devices=1 GPU each needs 2 GPUs;"
        f" {len(visible.split(',')) if visible else 0} visible (CUDA_VISIBLE_DEVICES={visible!r})"
        " (hydra.sweeper.split_gpus=false lets the workers share them)"
    )
    assert not (tmp_path / "jobs.jsonl").exists()  # no trial started


def test_recipe_search_in_sqlite_decides_without_test_scores(tmp_path):
    optuna = pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    result, rows = sweep(
        tmp_path, "hparams_search=bible_recipe", "hydra.sweeper.n_trials=2", "hydra.sweeper.fixed_points=[]",
        f"hydra.sweeper.storage={storage}", "trainer.max_steps=10", "trainer.val_check_interval=10",
        "hydra.sweeper.plots=false",
        # the toy corpus's own subwords: it has too few pieces for the searched vocabularies
        "data.subword.vocab_size=32", "data.subword.model_type=word",
        # toy sizes: a sweep override replaces the key's distribution, one value takes it out
        "model.hidden_size=choice(32, 64)", "model.embed_size=32", "data.batch_tokens=640",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(rows) == 2 and {r["status"] for r in rows} == {"ok"}
    assert all(r["bidirectional"] and r["reverse_source"] and r["lr"] for r in rows)
    assert {r["hidden_size"] for r in rows} <= {"32", "64"} and "embed_size" not in rows[0]
    assert "max_steps" not in rows[0]  # constant: not shown
    # evaluate.test=false: no test decoding at all, so the choice cannot see test scores.
    assert all(r["test_bleu"] == "" for r in rows)
    assert not list((tmp_path / "sweep").glob("*/test.hyp"))
    study = optuna.load_study(study_name="bible_recipe", storage=storage)
    assert states(study) == ["COMPLETE", "COMPLETE"]
    assert max(t.value for t in study.trials) == pytest.approx(float(rows[0]["val_bleu"]))


def test_the_command_line_wins_over_the_search_space():
    """A sweep override replaces a key's distribution; one value takes the key out of the search (it
    had been sampled over it)."""
    pytest.importorskip("optuna")
    from seq2seq.sweeper.space import search_space

    params = {"model.hidden_size": "choice(256, 512)", "module.optimizer.lr": "interval(0.001, 0.01)"}
    arguments = ["model.hidden_size=64", "module.optimizer.lr=choice(0.01, 0.03)", "trainer.max_steps=9"]
    space, fixed = search_space(params, arguments)
    assert list(space) == ["module.optimizer.lr"] and space["module.optimizer.lr"].choices == (0.01, 0.03)
    assert fixed == ["model.hidden_size=64", "trainer.max_steps=9"]


def test_a_continued_study_does_not_repeat_the_proposals_of_its_seed():
    """The first piece of bible_recipe_hyperband and its second each began with worker 0 at the sampler's
    seed: trial 6 repeated trial 2's values exactly. Only worker 0 of a new study keeps the seed."""
    optuna = pytest.importorskip("optuna")
    from omegaconf import OmegaConf

    from seq2seq.sweeper.workers import worker_sampler

    config = OmegaConf.create({"_target_": "optuna.samplers.TPESampler", "seed": 1234})
    space = {"module.optimizer.lr": optuna.distributions.FloatDistribution(1e-3, 6e-3, log=True)}

    def first_proposal(index: int, resumed: bool) -> float:
        study = optuna.create_study(sampler=worker_sampler(config, index, resumed))
        return study.ask(space).params["module.optimizer.lr"]

    new_study = first_proposal(0, resumed=False)
    assert first_proposal(0, resumed=False) == new_study  # a new study's search can be repeated
    assert first_proposal(1, resumed=False) != new_study
    assert first_proposal(0, resumed=True) != new_study
    assert worker_sampler(None, 0, resumed=True) is None  # Optuna's default sampler


def test_a_retry_records_the_rungs_where_its_attempt_passed_them():
    """A retry of an interrupted trial reports its attempt's validations again. Reported alone, the
    successive-halving pruner recorded the retry's first new value (after more training) at every rung the
    attempt had passed, against the other trials' values at those rungs: the retry always went on."""
    optuna = pytest.importorskip("optuna")
    from seq2seq.sweeper.workers import replay_reports

    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=10, reduction_factor=3)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    for value in (1.0, 2.0, 3.0):  # three trials that passed the first rung (step 10) and ended there
        other = study.ask()
        other.report(value, 10)
        other.should_prune()
        study.tell(other, value)
    attempt = study.ask()
    for step, value in ((10, 3.5), (20, 3.6)):  # the best at the first rung: it goes on
        attempt.report(value, step)
        assert not attempt.should_prune()
    study.tell(attempt, state=optuna.trial.TrialState.FAIL)  # interrupted
    retry = study.ask()
    replay_reports(study, retry, study.trials[attempt.number], pruner)
    retry.report(9.0, 25)  # trained on: far better than anything at step 10
    retry.should_prune()
    rungs = study.trials[retry.number].system_attrs
    assert rungs["completed_rung_0"] == 3.5  # the attempt's value at the rung, not 9.0
    assert study.trials[retry.number].intermediate_values == {10: 3.5, 20: 3.6, 25: 9.0}


def test_a_trial_whose_worker_died_asking_for_it_is_failed(tmp_path, monkeypatch):
    """A worker killed between asking for a trial and naming itself in it left the trial running for good
    (no worker, no process to find gone): counted toward n_trials by every command after."""
    pytest.importorskip("optuna")
    from seq2seq.sweeper import storage
    from seq2seq.trial import JOURNAL_FILE, StudySpec

    spec = StudySpec(str(tmp_path / JOURNAL_FILE), "orphans", "maximize")
    study = spec.load()
    unnamed = study.ask()
    named = study.ask()
    named.set_user_attr(storage.WORKER, "a-0")
    named.set_user_attr(storage.HOST_PID, f"{socket.gethostname()}:{os.getpid()}")  # alive: this process
    storage.fail_orphaned_trials(study, spec, tmp_path)
    assert states(study) == ["RUNNING", "RUNNING"]  # the unnamed one may still be being named
    monkeypatch.setattr(storage, "ORPHAN_AFTER", storage.datetime.timedelta(0))
    storage.fail_orphaned_trials(study, spec, tmp_path)
    assert states(study) == ["FAIL", "RUNNING"]
    assert study.trials[unnamed.number].user_attrs["error"] == "its worker stopped while asking for it"


def interrupted_trials(sweep_dir: Path, count: int) -> list:
    """A smoke_pruning study whose first ``count`` trials were interrupted by stops of the sweep."""
    optuna = pytest.importorskip("optuna")
    from seq2seq.trial import JOURNAL_FILE, StudySpec

    sweep_dir.mkdir(parents=True)
    study = StudySpec(str(sweep_dir / JOURNAL_FILE), "smoke_pruning", "maximize").load()
    lr = optuna.distributions.CategoricalDistribution([1e-7, 1e-3, 3e-3, 1e-2, 3e-2])
    trials = []
    for _ in range(count):
        trial = study.ask({"module.optimizer.lr": lr})
        trial.set_user_attr("error", "interrupted (KeyboardInterrupt)")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        trials.append(trial)
    return trials


ONE_WORKER = ["hydra.sweeper.workers=1", "trainer.max_steps=30", "hydra.sweeper.fixed_points=[]"]


@pytest.mark.slow
def test_interrupted_trials_are_not_failures_that_stop_a_search(tmp_path):
    """A search in pieces: each stop fails its running trials as interrupted. They counted toward
    max_failed_trials (n_trials by default), so after a few pieces every worker stopped at once."""
    sweep_dir = tmp_path / "sweep"
    interrupted_trials(sweep_dir, 3)
    command = smoke_search(tmp_path, *ONE_WORKER, "hydra.sweeper.n_trials=2")
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert states(study_of(sweep_dir, "smoke_pruning")).count("COMPLETE") == 2


@pytest.mark.slow
def test_a_retry_whose_checkpoint_was_cut_off_starts_afresh(tmp_path):
    """A worker killed while saving leaves a truncated last.ckpt; the retry that resumed from it raised
    before its trial began, and the worker died with it (the sweep ended short)."""
    sweep_dir = tmp_path / "sweep"
    (attempt,) = interrupted_trials(sweep_dir, 1)
    study = study_of(sweep_dir, "smoke_pruning")
    study.enqueue_trial(attempt.params, user_attrs={"retry_of": attempt.number})
    checkpoint = sweep_dir / str(attempt.number) / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"PK\x03\x04 cut")
    command = smoke_search(tmp_path, *ONE_WORKER, "hydra.sweeper.n_trials=1")
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    retry = study_of(sweep_dir, "smoke_pruning").trials[1]
    assert retry.state.name == "COMPLETE" and "resumed_from" not in retry.user_attrs
    assert f"trial {attempt.number}'s checkpoint cannot be read" in result.stderr + result.stdout


def test_a_baseline_outside_the_search_space_is_one_line(tmp_path):
    pytest.importorskip("optuna")
    result, _ = sweep(tmp_path, "hparams_search=smoke_pruning", "module.optimizer.lr=choice(0.003,0.03)")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        "hydra.sweeper.fixed_points[0]: module.optimizer.lr=0.01 is outside the search space" in result.stderr
    )


def test_without_optuna_the_error_names_the_extra(tmp_path):
    blocker = tmp_path / "no_optuna" / "optuna"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named optuna')\n")
    result = subprocess.run(
        [sys.executable, "train.py", "hparams_search=smoke_pruning", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(blocker.parent), "HYDRA_FULL_ERROR": "0"},
    )  # fmt: skip
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "error: hydra/sweeper=seq2seq needs Optuna: pip install 'seq2seq-lstm[sweep]'"
    )


def test_the_sweep_extra_has_current_optuna_and_sqlalchemy():
    pytest.importorskip("optuna")
    major = lambda name: int(version(name).split(".")[0])  # noqa: E731
    assert major("optuna") >= 4 and major("sqlalchemy") >= 2
    extra = next(
        line for line in (REPO / "pyproject.toml").read_text().splitlines() if line.startswith("sweep =")
    )
    assert "optuna>=4" in extra and not any(
        old in extra for old in ("hydra-optuna-sweeper", "sqlalchemy", "alembic")
    )


POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server (initdb, pg_ctl) in a temporary folder, run as an unprivileged user
    (initdb refuses root), stopped at the end; skipped where none can start."""
    pytest.importorskip("psycopg2")
    if not (POSTGRES_BIN / "initdb").exists():
        pytest.skip(f"no PostgreSQL 15 binaries in {POSTGRES_BIN}")
    as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    if as_user and not shutil.which("runuser"):
        pytest.skip("running as root without runuser: initdb refuses root")
    folder = Path(tempfile.mkdtemp(prefix="pg-"))
    folder.chmod(0o777)
    data = folder / "data"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = lambda *args: subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)  # noqa: E731
    init = run(str(POSTGRES_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust")
    if init.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"initdb failed: {init.stderr.strip()[-300:]}")
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    start = run(
        str(POSTGRES_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start"
    )
    try:
        if start.returncode != 0:
            pytest.skip(f"pg_ctl start failed: {start.stderr.strip()[-300:]}")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        run(str(POSTGRES_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_on_a_postgresql_study(tmp_path, postgres_url):
    result, rows = sweep(
        tmp_path, "hparams_search=smoke_pruning", f"hydra.sweeper.storage={postgres_url}",
        "hydra.sweeper.n_trials=3", "hydra.sweeper.pruner=null", "hydra.sweeper.plots=false",
        "hydra.sweeper.heartbeat_interval=5", "trainer.max_steps=60",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    study = study_of(tmp_path / "sweep", "smoke_pruning", storage=postgres_url)
    assert states(study) == ["COMPLETE"] * 3 and len(rows) == 3
    assert len({t.user_attrs["host_pid"] for t in study.trials}) == 2
    assert not (tmp_path / "sweep" / "optuna.journal").exists()


def test_the_intermediate_values_plot_stays_legible_with_many_trials(tmp_path):
    """Optuna's PNG legend has a row per trial: forty trials would make the figure a tall strip."""
    optuna = pytest.importorskip("optuna")
    pytest.importorskip("matplotlib")
    from seq2seq.sweeper.plots import write_plots

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(40):
        trial = study.ask()
        lr = trial.suggest_float("lr", 1e-4, 1e-2, log=True)
        for seconds in (300, 900):
            trial.report(lr * seconds, seconds)
        study.tell(trial, lr * 900)
    write_plots(study, tmp_path, step_unit="seconds")
    width, height = struct.unpack(">II", (tmp_path / "intermediate_values.png").read_bytes()[16:24])
    assert width > height
    assert "seconds of training" in (tmp_path / "intermediate_values.html").read_text()
