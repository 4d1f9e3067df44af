"""Data parallelism and resuming: sharded batches, DDP on CPU (2 and 8 gloo processes) with exact
validation scores and non-finite steps skipped on every process, resume after SIGKILL and after Ctrl-C."""

from __future__ import annotations

import csv
import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import psutil
import pytest
import torch
from hydra.utils import instantiate

from seq2seq.data.sampler import ResumableDataLoader, TokenBucketBatchSampler
from seq2seq.module import TranslationModule
from seq2seq.precision import resolve_trainer_precision
from tests.fault_callbacks import read_records
from tests.test_training import QUIET, REPO, run_script

RECORD = "+callbacks.record._target_=tests.fault_callbacks.RecordBatches"
NAN_AT_BATCH_3_ON_RANK_1 = [
    "+callbacks.nan._target_=tests.fault_callbacks.NanAtBatch",
    "+callbacks.nan.batch=3",
    "+callbacks.nan.rank=1",
]


def sampler(rank: int = 0, replicas: int = 1, lengths: list[int] | None = None) -> TokenBucketBatchSampler:
    rng = random.Random(0)
    lengths = lengths or [rng.randint(1, 30) for _ in range(500)]
    return TokenBucketBatchSampler(
        lengths, lengths, 200, shuffle=True, seed=3, num_replicas=replicas, rank=rank
    )


@pytest.mark.parametrize("replicas", [3, 5])
def test_every_rank_gets_an_equal_disjoint_share_of_the_batches(replicas):
    whole = sampler().batches(epoch=4)
    assert len(whole) % replicas != 0  # the uneven case
    shares = [sampler(rank, replicas).rank_batches(epoch=4) for rank in range(replicas)]
    assert len({len(share) for share in shares}) == 1
    assert len(shares[0]) == len(sampler(0, replicas))
    # Interleaved back, the shares are the whole epoch's batches, then repeats of its first ones.
    interleaved = [batch for step in zip(*shares, strict=True) for batch in step]
    assert interleaved[: len(whole)] == whole
    assert interleaved[len(whole) :] == whole[: len(interleaved) - len(whole)]
    # At every step the ranks hold different pairs.
    for step in zip(*shares, strict=True):
        pairs = [index for batch in step for index in batch]
        assert len(pairs) == len(set(pairs))


def test_fewer_batches_than_ranks_still_give_every_rank_one():
    lengths = [5] * 90  # 3 batches of at most 40 pairs
    three = sampler(0, 1, lengths)
    assert three.num_global_batches == 3
    shares = [sampler(rank, 8, lengths).rank_batches(epoch=0) for rank in range(8)]
    assert [len(share) for share in shares] == [1] * 8 == [len(sampler(r, 8, lengths)) for r in range(8)]
    assert {tuple(b) for share in shares for b in share} == {tuple(b) for b in three.batches(0)}


def test_order_is_a_function_of_seed_and_epoch():
    assert sampler(1, 2).rank_batches(2) == sampler(1, 2).rank_batches(2)
    assert sampler(1, 2).rank_batches(2) != sampler(1, 2).rank_batches(3)


def test_resume_skips_the_batches_already_trained_on():
    resumed = sampler(1, 2)
    resumed.resume(10)  # 5 batches on each of the 2 ranks
    assert list(resumed) == resumed.rank_batches(0)[5:]
    assert list(resumed) == resumed.rank_batches(0)  # only the first epoch after resuming is cut


PAIRS = list(range(500))  # a dataset whose items are their indices


@pytest.mark.parametrize(("before", "after"), [(3, 2), (2, 5), (4, 1), (1, 3)])
def test_a_resume_with_another_number_of_ranks_trains_each_batch_once(before, after):
    """Old ranks stopped after 7 batches each; the new ranks share exactly the global batches left."""
    whole = sampler().batches(epoch=0)
    done = 7 * before
    seen = [b for rank in range(before) for b in sampler(rank, before).rank_batches(0)[:7]]
    counts = []  # the trainer's count of batches per rank, set by each new rank's loader on resuming
    loaders = [
        ResumableDataLoader(
            PAIRS,
            batch_sampler=sampler(r, after),
            collate_fn=list,
            batches_done_fn=int,
            resume_count_fn=counts.append,
        )
        for r in range(after)
    ]
    for loader in loaders:
        loader.load_state_dict(
            {"global_batches_done": done, "global_batches": len(whole), "world_size": before}
        )
    rest = [list(loader) for loader in loaders]
    assert len({len(share) for share in rest}) == 1  # every rank gets as many: none waits in all-reduce
    interleaved = [b for step in zip(*rest, strict=True) for b in step]
    assert sorted(seen + interleaved[: len(whole) - done]) == sorted(whole)
    assert interleaved[: len(whole) - done] == whole[done:]
    assert counts == [len(loaders[0]) - len(rest[0])] * after  # the trainer ends the epoch with the sampler
    # Saved again 2 steps after the resume, the position counts the new ranks' batches.
    loaders[0].batches_done_fn = lambda: counts[0] + 2
    assert loaders[0].state_dict() == {
        "global_batches_done": done + 2 * after,
        "global_batches": len(whole),
        "world_size": after,
    }


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_on_two_ranks_with_the_next_global_batches(tmp_path):
    """A one-process run's checkpoint from step 12 (mid-epoch), resumed on 2 processes (trainer=ddp_cpu):
    step 12 + j trains the batches that the one process trained at steps 12 + 2j and 12 + 2j + 1."""
    cache, one_epoch = tmp_path / "cache", ["trainer.val_check_interval=12", "data.corpus.sizes.train=3000"]
    periodic = [  # a checkpoint at step 12 that stays
        "callbacks.last_checkpoint.every_n_train_steps=12",
        "callbacks.last_checkpoint.save_top_k=-1",
        "+callbacks.last_checkpoint.filename='at-{step}'",
    ]
    smoke(
        tmp_path / "reference",
        cache,
        "trainer.max_steps=20",
        *one_epoch,
        *periodic,
        *record(tmp_path / "ref"),
    )
    at_12 = tmp_path / "reference" / "checkpoints" / "at-step=12.ckpt"
    resumed = [f"ckpt_path='{at_12}'", "trainer.max_steps=16", *one_epoch, "trainer.val_check_interval=4"]
    smoke(
        tmp_path / "resumed", cache, *resumed, "trainer=ddp_cpu", "decoding.beam=1", *record(tmp_path / "r")
    )
    expected = {r["step"]: r["indices"] for r in read_records(tmp_path / "ref") if r["step"] >= 12}
    got = {
        (r["rank"], r["step"]): r["indices"] for rank in (0, 1) for r in read_records(tmp_path / "r", rank)
    }
    assert got == {(rank, 12 + j): expected[12 + 2 * j + rank] for rank in (0, 1) for j in range(4)}
    saved = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    (state,) = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state["global_batches_done"] == 20 and state["world_size"] == 2
    # The same checkpoint over another epoch plan: refused in one line.
    other = [f"hydra.run.dir={tmp_path / 'other'}", f"paths.cache_dir={cache}", f"ckpt_path='{at_12}'"]
    result = run_script("train.py", "experiment=smoke", *other, "data.batch_tokens=320", *QUIET)
    assert result.returncode == 2 and "error: ckpt_path: saved after 12 of the 34 batches" in result.stderr


def test_a_resume_over_another_epoch_plan_is_refused():
    loader = ResumableDataLoader(
        PAIRS, batch_sampler=sampler(0, 2), collate_fn=list, batches_done_fn=int, resume_count_fn=print
    )
    other = loader.batch_sampler.num_global_batches + 1
    with pytest.raises(ValueError, match=r"^ckpt_path: saved after 6 of the \d+ batches of an epoch, but"):
        loader.load_state_dict({"global_batches_done": 6, "global_batches": other, "world_size": 3})
    loader.load_state_dict(
        {"global_batches_done": 3 * -(-other // 3), "global_batches": other, "world_size": 3}
    )
    assert list(loader) == loader.batch_sampler.rank_batches(0)  # saved at an epoch's end: fine


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path, compose_config):
    """Two gloo processes: disjoint batches, no hang on an uneven batch count, a NaN loss on one process
    skips that step on both (module.nonfinite_loss=skip) and training goes on, exact validation scores."""
    odd = "data.batch_tokens=700"  # 31 training batches
    cfg = compose_config("experiment=smoke", odd)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    whole_epoch = datamodule._batch_sampler(datamodule.splits["train"], "train")
    assert whole_epoch.num_global_batches % 2 == 1  # one rank would be a batch short without padding

    run, record_path = tmp_path / "ddp", tmp_path / "batches"
    steps = whole_epoch.num_global_batches // 2 + 6  # the whole first epoch and some of the second
    result = run_script(
        "train.py", "experiment=smoke", odd, "trainer=ddp_cpu",
        f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", f"hydra.run.dir={run}",
        f"paths.cache_dir={tmp_path / 'cache'}", "logger=[csv,tensorboard]", *record(record_path), *QUIET,
        "module.nonfinite_loss=skip", "trainer.log_every_n_steps=5", *NAN_AT_BATCH_3_ON_RANK_1,
        *record_weights(tmp_path / "w"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    weights = [read_records(tmp_path / "w", rank) for rank in (0, 1)]
    assert weights[0] == weights[1]  # the replicas stay equal
    unchanged = [r["step"] for r in weights[0] if r["before"] == r["after"]]
    # Batch 3 of each epoch made no update; the step count moves on.
    batches_per_rank = (whole_epoch.num_global_batches + 1) // 2
    assert unchanged == [4, 4 + batches_per_rank] and len(weights[0]) == steps
    log = (run / "train.log").read_text()
    assert "Skipped 1 step(s) with a non-finite training loss so far; the first: (nan) at step 3" in log

    ranks = [read_records(record_path, rank) for rank in (0, 1)]
    assert [len(records) for records in ranks] == [steps, steps]
    for first, second in zip(*ranks, strict=True):
        assert first["step"] == second["step"]
        assert not set(first["indices"]) & set(second["indices"])
    first_epoch = {i for records in ranks for r in records if r["epoch"] == 0 for i in r["indices"]}
    assert first_epoch == set(range(len(datamodule.splits["train"])))

    # Only the first process writes the run directory's files.
    assert result.stdout.count("Test split") == 1 and (run / "config_resolved.yaml").is_file()
    assert (result.stdout + result.stderr).count("Training took") == 2  # both log to the console...
    assert (run / "train.log").read_text().count("Training took") == 1  # ...one to the file
    assert all(p.stat().st_size == 0 for p in run.glob("*.log") if p.name != "train.log")
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1

    # The logged validation scores are those of the whole validation set, as one process finds them.
    logged = [row for row in csv.DictReader((run / "logs" / "metrics.csv").open()) if row.get("val_bleu")]
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    module = TranslationModule.load_from_checkpoint(best, weights_only=False)
    precision = resolve_trainer_precision(
        cfg.trainer.precision, "cpu"
    )  # what the run trained and validated in
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision=precision, logger=False, enable_progress_bar=False
    )
    (single,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    assert float(logged[-1]["val_bleu"]) == pytest.approx(single["val_bleu"], abs=1e-6)
    assert float(logged[-1]["val_loss"]) == pytest.approx(single["val_loss"], rel=1e-5)


@pytest.mark.slow
def test_eight_processes_share_three_batches_without_hanging(tmp_path):
    """8 gloo processes, 3 training batches and 1 validation batch: every process trains one batch per
    epoch, and validation and test scoring finish (a process with no batch would hang the others)."""
    tiny = [
        "data.corpus.sizes={train:60,valid:8,test:8}", "data.equal_source_length=false",
        "data.batch_tokens=200", "model.embed_size=8", "model.hidden_size=8", "decoding.beam=1",
    ]  # fmt: skip
    steps = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.devices=8"]
    result = smoke(
        tmp_path / "run", tmp_path / "cache", "trainer=ddp_cpu", *tiny, *steps, *record(tmp_path / "b")
    )
    log = (tmp_path / "run" / "train.log").read_text()
    assert "train: 5 of 3 batches repeat each epoch so that each of the 8 processes gets 1" in log
    assert "valid: 7 of 1 batches repeat each epoch so that each of the 8 processes gets 1" in log
    ranks = [read_records(tmp_path / "b", rank) for rank in range(8)]
    assert [[r["epoch"] for r in records] for records in ranks] == [[0, 1]] * 8
    assert sorted({i for records in ranks for i in records[0]["indices"]}) == list(range(60))
    assert result.stdout.count("Test split") == 1


def smoke(run: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python train.py experiment=smoke`` into ``run``; must succeed."""
    result = run_script(
        "train.py", "experiment=smoke", f"hydra.run.dir={run}", f"paths.cache_dir={cache}", *QUIET, *overrides
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def record(path: Path) -> list[str]:
    return [RECORD, f"+callbacks.record.path={path}"]


def record_weights(path: Path) -> list[str]:
    return [
        "+callbacks.weights._target_=tests.fault_callbacks.RecordWeights",
        f"+callbacks.weights.path={path}",
    ]


def start_training(run: Path, cache: Path, *overrides: str) -> subprocess.Popen:
    """``python train.py experiment=smoke`` in the background, with Ctrl-C delivered as in a terminal."""
    return subprocess.Popen(
        [sys.executable, "train.py", "experiment=smoke", f"hydra.run.dir={run}", f"paths.cache_dir={cache}",
         *QUIET, *overrides],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip


def wait_for_checkpoint(process: subprocess.Popen, path: Path, min_step: int, timeout: float = 300) -> int:
    """Wait until ``path`` holds a checkpoint of at least ``min_step`` steps; return its step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"training exited early ({process.returncode}): {process.stderr.read()[-3000:]}")
        if path.is_file():  # written under a temporary name and renamed: always complete
            step = torch.load(path, map_location="cpu", weights_only=False)["global_step"]
            if step >= min_step:
                return step
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"no checkpoint of {min_step} steps at {path} after {timeout} s")


def checkpoint_state(path: Path) -> tuple[int, int, float]:
    """Global step, scheduler step and learning rate stored in a checkpoint."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    scheduler = checkpoint["lr_schedulers"][0]
    return checkpoint["global_step"], scheduler["last_epoch"], scheduler["_last_lr"][0]


@pytest.mark.slow
def test_a_run_stopped_inside_an_epoch_by_max_steps_resumes_in_that_epoch(tmp_path):
    """last.ckpt written after training stopped mid-epoch continues with the same epoch's next batch: the
    batches of 8 + 8 steps are those of 16 straight steps (the smoke split has more than 8 batches)."""
    cache, straight, resumed = tmp_path / "cache", tmp_path / "straight", tmp_path / "resumed"
    smoke(tmp_path / "a", cache, "trainer.max_steps=16", *record(straight))
    smoke(tmp_path / "b", cache, "trainer.max_steps=8", *record(resumed))
    last = tmp_path / "b" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == 0  # Lightning's count said 1
    smoke(tmp_path / "c", cache, f"ckpt_path={last}", "trainer.max_steps=16", *record(resumed))
    batches = [(r["epoch"], r["indices"]) for r in read_records(resumed)]
    assert batches == [(r["epoch"], r["indices"]) for r in read_records(straight)]


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_steps_schedule_and_batches(tmp_path):
    cache, every = tmp_path / "cache", "callbacks.last_checkpoint.every_n_train_steps=10"
    killed = start_training(
        tmp_path / "killed", cache, every, "trainer.max_steps=100000", *record(tmp_path / "k")
    )
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    wait_for_checkpoint(killed, last, min_step=25)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    step = checkpoint_state(last)[0]  # the run may have saved again before it died
    total = step + 15

    resumed, reference = tmp_path / "resumed", tmp_path / "reference"
    same = [every, f"trainer.max_steps={total}", "trainer.val_check_interval=5"]
    smoke(resumed, cache, f"ckpt_path={last}", *same, *record(tmp_path / "r"))
    smoke(reference, cache, *same, *record(tmp_path / "ref"))

    # Same step count and learning-rate schedule as a run that was never stopped...
    final = [checkpoint_state(run / "checkpoints" / "last.ckpt") for run in (resumed, reference)]
    assert final[0] == pytest.approx(final[1]) and final[0][:2] == (total, total)
    # ...and the same batches from the step it resumed at, mid-epoch included.
    expected = [(r["step"], r["epoch"], r["indices"]) for r in read_records(tmp_path / "ref")]
    got = [(r["step"], r["epoch"], r["indices"]) for r in read_records(tmp_path / "r")]
    assert got == [e for e in expected if e[0] >= step]


def wait_for_step(process: subprocess.Popen, min_step: int, timeout: float = 300) -> int:
    """Read the run's progress lines (stdout, seq2seq.progress.ProgressLog) until one reports at least
    ``min_step`` steps; return that step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            pytest.fail(f"training exited early ({process.returncode}): {process.stderr.read()[-3000:]}")
        match = re.search(r"\] - step (\d+) \| epoch", line)
        if match and int(match[1]) >= min_step:
            return int(match[1])
    process.kill()
    pytest.fail(f"no progress line of {min_step} steps after {timeout} s")


# A progress line after every batch, and no periodic last.ckpt: a last.ckpt can only be the one saved
# when the run was stopped.
STOP_ONLY = ["callbacks.progress_log.every_seconds=0", "callbacks.last_checkpoint.every_n_train_steps=100000"]


@pytest.mark.slow
def test_ctrl_c_leaves_a_last_checkpoint_to_resume_from(tmp_path):
    cache, run = tmp_path / "cache", tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    process = start_training(run, cache, *STOP_ONLY, "trainer.max_steps=100000")
    seen = wait_for_step(process, min_step=10)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stdout + stderr
    # One line says where and what was saved, on the console and in train.log...
    said = re.search(r"Interrupted by Ctrl-C \(SIGINT\) at step (\d+), epoch \d+: saved (\S+);", stdout)
    assert said and Path(said[2]) == last and said[0] in (run / "train.log").read_text()
    step = int(said[1])
    # ...and last.ckpt holds the state of that step, with the optimizer; nothing else was written.
    assert step >= seen and checkpoint_state(last)[0] == step
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]
    assert json.loads((run / "result.json").read_text())["status"] == "interrupted"

    resume = [f"ckpt_path={last}", f"trainer.max_steps={step + 5}", "trainer.val_check_interval=5"]
    smoke(tmp_path / "resumed", cache, *resume)
    assert checkpoint_state(tmp_path / "resumed" / "checkpoints" / "last.ckpt")[0] == step + 5


def validation_steps(run: Path) -> list[int]:
    """The steps at which a run validated, from its train.log (seq2seq.progress.ValidationLog)."""
    return [int(step) for step in re.findall(r"validation at step (\d+) \|", (run / "train.log").read_text())]


@pytest.mark.slow
@pytest.mark.parametrize(("where", "trained"), [("batch start", 7), ("after step", 8)])
def test_a_run_interrupted_inside_a_batch_resumes_on_the_same_steps(tmp_path, where, trained):
    """Ctrl-C can land inside a batch: as it begins (counted as begun, not trained) or right after its
    optimizer step (trained, not yet counted). The resumed run trains the same batches, each once, at
    the same learning rates, and validates at the same steps as a run never interrupted (Lightning
    rewinds only the epoch's counters on restart, not the run's, which moved every later validation a
    step; a trained batch not counted was trained again)."""
    cache, every = tmp_path / "cache", ["trainer.max_steps=20", "trainer.val_check_interval=5"]
    smoke(tmp_path / "straight", cache, *every, *record(tmp_path / "straight_batches"))
    interrupted = tmp_path / "interrupted"
    ctrl_c = [
        "+callbacks.ctrl_c._target_=tests.fault_callbacks.CtrlCAtStep", "+callbacks.ctrl_c.step=7",
        f"+callbacks.ctrl_c.where={where}",
    ]  # fmt: skip
    result = run_script(
        "train.py", "experiment=smoke", f"hydra.run.dir={interrupted}", f"paths.cache_dir={cache}", *QUIET,
        *STOP_ONLY, *every, *ctrl_c,
    )  # fmt: skip
    assert result.returncode == 130, result.stderr[-3000:]
    last = interrupted / "checkpoints" / "last.ckpt"
    assert f"Interrupted by Ctrl-C (SIGINT) at step {trained}" in result.stdout
    step, scheduler_steps, _ = checkpoint_state(last)
    assert step == scheduler_steps == trained
    resumed = tmp_path / "resumed"
    smoke(resumed, cache, f"ckpt_path={last}", *every, *record(tmp_path / "resumed_batches"))
    assert validation_steps(interrupted) == [5] and validation_steps(resumed) == [10, 15, 20]
    assert validation_steps(tmp_path / "straight") == [5, 10, 15, 20]
    straight = [(r["step"], r["indices"], r["lr"]) for r in read_records(tmp_path / "straight_batches")]
    resumed_batches = [(r["step"], r["indices"], r["lr"]) for r in read_records(tmp_path / "resumed_batches")]
    assert resumed_batches == straight[trained:]


@pytest.mark.slow
def test_gradient_accumulation_steps_once_per_k_batches(tmp_path):
    run = tmp_path / "run"
    accumulate = ["trainer.accumulate_grad_batches=3", "trainer.max_steps=5", "trainer.val_check_interval=15"]
    smoke(run, tmp_path / "cache", *accumulate, *record(tmp_path / "b"))
    assert len(read_records(tmp_path / "b")) == 15  # batches
    assert checkpoint_state(run / "checkpoints" / "last.ckpt")[:2] == (5, 5)  # optimizer and scheduler steps


# What a non-logging training step may do besides DDP's gradient all-reduce, and why.
PER_STEP = {
    # The token-weighted loss needs every process's token count; on NCCL the all-reduce is queued on the
    # device's stream and the host does not wait for it.
    "dist.all_reduce from module.py:training_step",
    # The source lengths stay on the CPU (transfer_batch_to_device leaves them there for packing).
    "Tensor.__bool__ from encoder.py:forward",
}
# What the first training hook after a validation may do, once: the validation's log line reads the best
# checkpoint's score (seq2seq.progress.ValidationLog, rank 0).
AFTER_VALIDATION = {"Tensor.__float__ from progress.py:flush"}
# trainer=ddp (which builds on trainer=gpu) on the CPU, with one loader process per rank.
GPU_RUN_ON_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true"]
GPU_RUN_ON_CPU += ["data.num_workers=1", "data.pin_memory=false", "data.batch_tokens=700"]
COUNT_SYNCS = "+callbacks.sync._target_=tests.fault_callbacks.CountSynchronisations"


@pytest.mark.slow
def test_non_logging_steps_read_nothing_from_the_device_and_call_no_collective(tmp_path):
    """2 gloo processes with the callbacks trainer=ddp configures (early stopping added; the progress line
    after every batch): every host read of a tensor and every collective, counted per optimizer step."""
    every = 4
    steps = ["trainer.max_steps=24", "trainer.val_check_interval=12", f"trainer.log_every_n_steps={every}"]
    callbacks = ["callbacks=early_stopping", "callbacks.progress_log.every_seconds=0"]
    count = [COUNT_SYNCS, f"+callbacks.sync.path={tmp_path / 'sync'}"]
    smoke(tmp_path / "run", tmp_path / "cache", *GPU_RUN_ON_CPU, *steps, *callbacks, *count)
    for rank in (0, 1):
        record = json.loads((tmp_path / f"sync.rank{rank}").read_text())
        steps = {int(step): events for step, events in record["steps"].items()}
        # After the last step, training ends with a validation (seq2seq.callbacks.FinalValidation sets
        # should_stop there), which makes Lightning log once more: only what logging steps do, once.
        end = steps.pop(25, {})
        logging_sites = {site for step, events in steps.items() if step % every == 0 for site in events}
        assert set(end) <= logging_sites | AFTER_VALIDATION, f"rank {rank}, at the end: {end}"
        assert sorted(steps) == list(range(1, 25))
        for step, events in steps.items():
            assert events.pop("DDP gradient all-reduce from module.py:backward") == 1
            if step % every:
                allowed = PER_STEP | (AFTER_VALIDATION if step == 13 else set())  # validation at 12
                assert set(events) <= allowed, f"rank {rank}, step {step}: {events}"
            else:  # the counting sees what logging reads
                assert "Tensor.tolist from module.py:_log_training_step" in events
        assert record["epoch_ends"] == {}


@pytest.mark.slow
def test_a_sigterm_to_one_process_stops_both_at_the_next_logging_step(tmp_path):
    """Lightning's own handling stops the process that got the signal after its batch and leaves the other
    waiting in its next collective; here both agree on logging steps and stop together."""
    run, every = tmp_path / "run", 5
    process = start_training(
        run,
        tmp_path / "cache",
        "trainer=ddp_cpu",
        *STOP_ONLY,
        "trainer.max_steps=100000",
        f"trainer.log_every_n_steps={every}",
    )
    try:
        wait_for_step(process, min_step=3)
        children = psutil.Process(process.pid).children()
        (second,) = [p for p in children if any(arg.endswith("train.py") for arg in p.cmdline())]
        second.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("a SIGTERM to the second process left the first running or waiting")
    finally:
        for leftover in psutil.Process(process.pid).children() if process.poll() is None else []:
            leftover.kill()
        process.kill()
    assert process.returncode == 143, stderr[-3000:]
    second.wait(timeout=30)  # gone too (its exit status went to the first process)
    said = re.search(r"Stopped by SIGTERM at step (\d+), epoch \d+: saved (\S+);", stdout)
    assert said and Path(said[2]) == run / "checkpoints" / "last.ckpt"
    step = int(said[1])
    assert (step + 1) % every == 0  # agreed on before the batch of a logging step
    assert checkpoint_state(Path(said[2]))[0] == step
