"""Cluster runs resumed and requeued: whole ``fit`` runs on 1-3 gloo processes resumed on another number
of processes, a requeued or retried run whose time budget is spent, a budget schedule resumed with
another budget, the time-budget rate on ranks whose clocks differ."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seq2seq.data.sampler import ResumableDataLoader
from tests.fault_callbacks import read_records
from tests.test_distributed import PAIRS, record, sampler, smoke

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
