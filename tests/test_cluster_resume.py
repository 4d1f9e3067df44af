"""Cluster runs resumed and requeued: whole ``fit`` runs on 1-3 gloo processes resumed on another number
of processes, the time-budget rate and a validation interval in seconds on ranks whose clocks differ,
a requeued or retried run whose time budget is spent (a budget schedule resumed with another budget:
tests/test_schedules.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seq2seq.data.sampler import ResumableDataLoader
from seq2seq.trial import TRIAL_ENV, StudySpec
from tests.fault_callbacks import read_records
from tests.test_cluster_signals import train_two_ranks
from tests.test_distributed import PAIRS, STOP_ONLY, checkpoint_state, record, record_weights, sampler, smoke
from tests.test_robustness import fake_slurm
from tests.test_training import QUIET, REPO

# No test decoding and greedy validation: these runs are about training.
SHORT = ["evaluate.test=false", "decoding.beam=1", "trainer.val_check_interval=1000"]


def on_ranks(count: int) -> list[str]:
    """The trainer options of a run on ``count`` processes (gloo DDP from 2 on)."""
    return [] if count == 1 else ["trainer=ddp_cpu", f"trainer.devices={count}"]


def batches_by_epoch(path: Path, ranks: int, epoch: int) -> list[tuple[int, ...]]:
    """The pair indices of each batch that ``ranks`` processes recorded (RecordBatches) in ``epoch``."""
    return [
        tuple(r["indices"]) for rank in range(ranks) for r in read_records(path, rank) if r["epoch"] == epoch
    ]


@pytest.mark.slow
@pytest.mark.parametrize(("before", "after"), [(1, 2), (2, 1), (2, 3)])
def test_a_resume_on_another_number_of_ranks_trains_each_batch_of_the_epoch_once(tmp_path, before, after):
    """A run stopped mid-epoch on ``before`` processes, resumed from its last.ckpt on ``after``: the rest
    of the epoch is trained, each batch once (but for the repeats that give every rank as many), and the
    next epoch starts after it. Lightning's per-rank count of the epoch's batches, restored as saved, used
    to end the epoch at the new ranks' number of batches per epoch: with more ranks, early."""
    cache, first, resumed = tmp_path / "cache", tmp_path / "first", tmp_path / "resumed"
    steps = 10 // before  # global batches of the epoch trained before: 10 or 12
    smoke(first, cache, *SHORT, *on_ranks(before), f"trainer.max_steps={steps}", *record(tmp_path / "a"))
    last = first / "checkpoints" / "last.ckpt"
    (position,) = torch.load(last, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    total, done = position["global_batches"], position["global_batches_done"]
    assert done == steps * before < total
    per_rank = -(-(total - done) // after)  # the rest of the epoch, shared by the new ranks
    smoke(
        resumed, cache, *SHORT, *on_ranks(after), f"ckpt_path={last}",
        f"trainer.max_steps={steps + per_rank + 2}", *record(tmp_path / "b"),
    )  # fmt: skip
    trained = batches_by_epoch(tmp_path / "a", before, 0)
    rest = batches_by_epoch(tmp_path / "b", after, 0)
    assert len(rest) == per_rank * after  # was fewer: the epoch ended early
    assert len(set(trained)) == len(trained) == done and not set(trained) & set(rest)
    assert len(set(trained) | set(rest)) == total  # every batch of the epoch
    assert len(rest) - len(set(rest)) == per_rank * after - (total - done) < after  # only the repeats
    pairs = {i for batch in trained + rest for i in batch}
    assert pairs == set(range(3000))  # the toy corpus's training pairs, all seen in the epoch
    assert len(batches_by_epoch(tmp_path / "b", after, 1)) == 2 * after  # then the next epoch


def test_an_epoch_finished_after_a_resume_on_more_ranks_saves_the_next_epochs_start():
    """A run resumed at global batch 10 on 3 ranks whose fit ends with the epoch's last batch: last.ckpt
    (the trainer's count reset for the next epoch) says the next epoch starts at its first batch."""
    counts: list[int] = []
    loader = ResumableDataLoader(
        PAIRS, batch_sampler=sampler(0, 3), collate_fn=list, batches_done_fn=lambda: counts[-1],
        resume_count_fn=counts.append,
    )  # fmt: skip
    total = loader.batch_sampler.num_global_batches
    loader.load_state_dict({"global_batches_done": 10, "global_batches": total, "world_size": 1})
    served = list(loader)
    assert counts[0] + len(served) == len(loader)  # the trainer's count reaches its epoch's end
    counts.append(len(loader))
    assert loader.state_dict()["global_batches_done"] >= total  # the epoch's end
    counts.append(0)  # fit ended: seq2seq.private_apis.restart_finished_epoch resets the count
    assert loader.state_dict()["global_batches_done"] == 0


@pytest.mark.slow
def test_ranks_whose_clocks_differ_apply_the_same_time_budget_rate_and_stay_equal(tmp_path):
    """2 gloo processes under a time budget with a linear decay; the second's clock starts 3 s late (so it
    reads 5 % less of the minute used): both train every step at the same rate, their weights stay equal.
    Each used to read its own clock, apply its own rate, and drift apart (DDP averages gradients, never
    weights)."""
    budget = [
        "module.scheduler.name=linear", "module.scheduler.warmup_steps=1", "trainer.max_steps=-1",
        "trainer.max_time='00:00:01:00'", "trainer.log_every_n_steps=4",
        "+callbacks.stop._target_=tests.fault_callbacks.StopAtStep", "+callbacks.stop.step=14",
        "+callbacks.late._target_=tests.cluster_callbacks.SleepAtTrainStart", "+callbacks.late.rank=1",
        "+callbacks.late.seconds=3", "+callbacks.lr._target_=tests.fault_callbacks.RecordLearningRates",
        f"+callbacks.lr.path={tmp_path / 'lr'}",
    ]  # fmt: skip
    smoke(
        tmp_path / "run", tmp_path / "cache", *SHORT, *on_ranks(2), *budget, *record_weights(tmp_path / "w")
    )
    rates = [[(r["step"], r["lr"]) for r in read_records(tmp_path / "lr", rank)] for rank in (0, 1)]
    assert [step for step, _ in rates[0]] == list(range(15))
    assert rates[0][-1][1] < rates[0][1][1]  # the rate decays with the time used
    assert rates[0] == rates[1]
    weights = [read_records(tmp_path / "w", rank) for rank in (0, 1)]
    assert len(weights[0]) == 14 and weights[0] == weights[1]


@pytest.mark.slow
def test_ranks_whose_clocks_differ_validate_a_duration_interval_at_the_same_steps(tmp_path):
    """2 gloo processes validating every 4 s of training (``trainer.val_check_interval='00:00:00:04'``);
    the second takes 3 s longer to make its training loader, so its clock for the interval starts 3 s
    after the first's. Both validate at the same steps and the job ends. Before, each process asked
    its own clock after every batch (Lightning's epoch loop): the first to see the interval pass went to
    validate while the other trained on, their collectives met out of order, and the job hung (in 2 of 3
    runs of the old code; the third happened to pass)."""
    steps = tmp_path / "validations"
    options = [
        "evaluate.test=false", "decoding.beam=1", "trainer.max_steps=-1", "trainer.max_time='00:00:00:14'",
        "trainer.val_check_interval='00:00:00:04'", "trainer.log_every_n_steps=2",
        "+callbacks.late._target_=tests.cluster_callbacks.SlowTrainLoader", "+callbacks.late.rank=1",
        "+callbacks.late.seconds=3",
        "+callbacks.validations._target_=tests.cluster_callbacks.RecordValidationSteps",
        f"+callbacks.validations.path={steps}",
    ]  # fmt: skip
    result = train_two_ranks(tmp_path / "run", tmp_path / "cache", *options)
    assert result.returncode == 0, result.stderr[-3000:]
    validated = [Path(f"{steps}.rank{rank}").read_text().split() for rank in (0, 1)]
    assert validated[0] == validated[1]
    assert len(validated[0]) >= 3, validated  # two or more while training, one at its end


@pytest.mark.slow
def test_a_resume_into_a_new_folder_where_one_rank_misses_the_best_checkpoint_goes_on(tmp_path):
    """A run resumed on 2 gloo processes into a new run directory, where the second process does not see
    the first run's best checkpoint (kept on another node's own disk): both carry it on as the first
    process sees it, validate and finish with the same best checkpoint. Before, each process checked for
    the file itself: the second forgot the best score, the checkpoint callbacks' collectives paired up
    wrongly at the next validation, and the first kept the resumed best (step 20, BLEU 3.25) over step
    30's (18.79, never saved) while the second held step 30's as its best."""
    first, resumed, cache = tmp_path / "first", tmp_path / "resumed", tmp_path / "cache"
    quick = [*SHORT[:2], "trainer.val_check_interval=10"]
    smoke(first, cache, *quick, *STOP_ONLY, "trainer.max_steps=20")
    elsewhere = ["+callbacks.elsewhere._target_=tests.cluster_callbacks.BestCheckpointElsewhere"]
    elsewhere += ["+callbacks.elsewhere.rank=1"]
    best = ["+callbacks.best._target_=tests.cluster_callbacks.RecordBestCheckpoint"]
    best += [f"+callbacks.best.path={tmp_path / 'best'}"]
    resume = [f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}", "trainer.max_steps=30"]
    result = train_two_ranks(resumed, cache, *quick, *resume, *elsewhere, *best)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed with the best checkpoint so far" in (resumed / "train.log").read_text()
    held = [Path(f"{tmp_path / 'best'}.rank{rank}").read_text() for rank in (0, 1)]
    assert held[0] == held[1] and held[0].strip(), held


# A time budget that ends training: 6 seconds of the smoke run, then validation and the evaluation.
TIME_BUDGET = ["trainer.max_steps=-1", "trainer.max_time='00:00:00:06'", "trainer.val_check_interval=1000"]


@pytest.mark.slow
def test_a_requeued_job_whose_time_budget_ended_training_goes_on_to_the_evaluation(tmp_path):
    """SIGUSR1 during the evaluation after a training stopped by trainer.max_time requeues the job; the
    requeued job resumes from the final last.ckpt, whose training time is all of max_time: it trains no
    step and evaluates (it was refused: 'the run has already trained for ..., all of trainer.max_time')."""
    env, requeues = fake_slurm(tmp_path)
    run, cache = tmp_path / "slurm-4242", tmp_path / "cache"
    job = [sys.executable, "train.py", "experiment=smoke", f"hydra.run.dir={run}", f"paths.cache_dir={cache}"]
    job += [*QUIET, *TIME_BUDGET, "decoding.beam=1"]
    process = subprocess.Popen(
        job, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    seen = ""
    while "Best checkpoint:" not in seen:
        seen = process.stdout.readline()
        assert seen or process.poll() is None, process.stderr.read()[-3000:]
    process.send_signal(signal.SIGUSR1)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]  # the fake scontrol does not stop the job
    assert "SLURM requeue signal" in stdout and requeues.read_text() == "requeue 4242\n"
    steps = checkpoint_state(run / "checkpoints" / "last.ckpt")[0]
    (run / "result.json").unlink()  # as if SLURM had stopped the job in its evaluation

    requeued = subprocess.run(
        [*job, *record(tmp_path / "batches")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert "Requeued SLURM job: resuming from" in requeued.stdout and "Test split" in requeued.stdout
    assert "training is done: going on to the evaluation" in requeued.stdout
    assert not Path(f"{tmp_path / 'batches'}.rank0").exists()  # no training step
    assert checkpoint_state(run / "checkpoints" / "last.ckpt")[0] == steps
    assert json.loads((run / "result.json").read_text())["status"] == "ok"


@pytest.mark.slow
def test_a_sweep_retry_of_a_trial_whose_time_budget_ended_training_goes_on_to_the_evaluation(tmp_path):
    """A retried trial (hydra/sweeper=seq2seq, retry_killed) runs as its training job with the trial in
    its environment and ckpt_path naming the killed attempt's newest checkpoint. An attempt killed in its
    evaluation after max_time ended its training left a last.ckpt with no time left: the retry evaluates
    it instead of failing (and losing the trained trial)."""
    cache, killed = tmp_path / "cache", tmp_path / "0"
    smoke(killed, cache, *TIME_BUDGET, "decoding.beam=1", "evaluate.test=false")
    last = killed / "checkpoints" / "last.ckpt"
    spec = StudySpec(storage=str(tmp_path / "optuna.journal"), name="budget", direction="maximize")
    trial = spec.load().ask()  # the retry, running
    trial_env = {"storage": spec.storage, "study": spec.name, "trial": trial.number, "pruner": None}
    env = {
        **os.environ,
        TRIAL_ENV: json.dumps({**trial_env, "prune_on": "steps", "heartbeat_interval": None}),
    }
    retry = tmp_path / "1"
    result = subprocess.run(
        [sys.executable, "train.py", "experiment=smoke", f"hydra.run.dir={retry}", f"paths.cache_dir={cache}",
         *QUIET, *TIME_BUDGET, "decoding.beam=1", f"ckpt_path={last}", *record(tmp_path / "batches")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training is done: going on to the evaluation" in result.stdout and "Test split" in result.stdout
    assert not Path(f"{tmp_path / 'batches'}.rank0").exists()
    record_ = json.loads((retry / "result.json").read_text())
    assert record_["status"] == "ok" and record_["test_bleu"] is not None
