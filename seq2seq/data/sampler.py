"""The training epoch: token-budget batches of similar length (bucketing), their order per epoch, the
share of each data-parallel rank (sharding), and the position in the epoch that a resumed run continues
from (the only resume state of the data side).

Everything here works on numpy arrays of lengths: an epoch's batches are planned with a few vectorized
sorts, so a split of 10M pairs costs a process 8 bytes a pair.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Sampler

from seq2seq.errors import UserError


@dataclass
class BatchPlan:
    """An epoch's batches without a Python list per batch: batch b is ``order[starts[b]:ends[b]]``.

    ``starts``/``sizes`` are in the order the batches are served (shuffled); ``order`` keeps them in
    length order.
    """

    order: np.ndarray
    starts: np.ndarray
    sizes: np.ndarray

    def __len__(self) -> int:
        return len(self.starts)

    def batch(self, b: int) -> list[int]:
        start = self.starts[b]
        return self.order[start : start + self.sizes[b]].tolist()

    def batches(self) -> list[list[int]]:
        return [self.batch(b) for b in range(len(self))]

    @classmethod
    def from_batches(cls, batches: list[list[int]]) -> BatchPlan:
        sizes = np.fromiter(map(len, batches), dtype=np.int64, count=len(batches))
        order = np.fromiter((i for b in batches for i in b), dtype=np.int64, count=int(sizes.sum()))
        return cls(order, np.cumsum(sizes) - sizes, sizes)


class TokenBucketBatchSampler(Sampler[list[int]]):
    """Batches of similar-length pairs whose padded size stays within ``batch_tokens``.

    Pairs are sorted by source then target length (ties broken at random when shuffling) and cut
    into batches of at most ``batch_tokens`` padded tokens (batch size x longest side); with
    ``shuffle`` the batch order is shuffled too. With ``equal_source_length`` a batch never mixes
    source lengths, so its source needs no padding and the encoder no packing (much faster on CPU).
    The order is a pure function of ``seed`` and the epoch, read from ``epoch_fn`` when iteration
    starts, so a run resumed at an epoch sees that epoch's order. Lengths are numpy arrays; the sort
    and the shuffles are numpy's, and the cut costs one small vectorized step per batch.

    Under data parallelism every rank builds the same global batches and takes every
    ``num_replicas``-th one from ``rank`` on. The list is first extended by repeating its batches
    cyclically to ``len(self) * num_replicas``, so every rank gets the same number of batches (a rank
    with one batch fewer would wait forever in the gradient all-reduce), even with fewer batches than
    ranks. :meth:`resume` skips the global batches that a resumed run has already trained on in the
    current epoch, with the same number of ranks or another.

    ``epoch_pairs`` (a :class:`CorpusMixture`'s ``draw``), if given, says which pairs (indices, repeats
    allowed) make each epoch; they are bucketed as above, each copy layer on its own (every pair's first
    copy, then the second copies of the pairs drawn twice or more, ...), so that the copies of an
    oversampled pair, which share its length, go to different batches spread over the epoch instead of
    one. The number of batches is that of epoch 0's plan: an epoch whose draw cuts into more batches
    drops its last served ones, one with fewer repeats its first ones, so that every epoch and every
    rank has the same count.
    """

    def __init__(
        self,
        src_lengths: Sequence[int] | np.ndarray,
        tgt_lengths: Sequence[int] | np.ndarray | None,
        batch_tokens: int,
        shuffle: bool,
        seed: int = 0,
        epoch_fn: Callable[[], int] = lambda: 0,
        equal_source_length: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        epoch_pairs: Callable[[int], np.ndarray] | None = None,
    ) -> None:
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        # An array of lengths (the prepared cache's) is used as it is, not copied.
        self.src_lengths = np.asarray(src_lengths, dtype=None if len(src_lengths) else np.int64)
        self.tgt_lengths = np.zeros_like(self.src_lengths) if tgt_lengths is None else np.asarray(tgt_lengths)
        if len(self.src_lengths) != len(self.tgt_lengths):
            raise ValueError(f"{len(self.src_lengths)} source but {len(self.tgt_lengths)} target lengths")
        self.batch_tokens = batch_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.epoch_fn = epoch_fn
        self.equal_source_length = equal_source_length
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch_pairs = epoch_pairs
        self._plans: dict[int, BatchPlan] = {}  # the last epoch's plan, planned once
        # Every epoch sorts the same lengths, so the number of batches never changes.
        self.num_global_batches = len(self.plan(0))
        self._resume_at = 0  # global batches of the next iteration's epoch done before, set by resume()
        self.iteration_start = 0  # the global position the current iteration started from
        self.served_iteration = False  # the current iteration has served all its batches

    def plan(self, epoch: int) -> BatchPlan:
        """The epoch's global batches, in the order they are served."""
        if epoch not in self._plans:
            self._plans = {epoch: self._plan(epoch)}
        return self._plans[epoch]

    def _plan(self, epoch: int) -> BatchPlan:
        rng = np.random.default_rng([self.seed, epoch])
        count = len(self.src_lengths)
        pairs = None if self.epoch_pairs is None else self.epoch_pairs(epoch)
        # Sorting a random permutation stably breaks ties at random.
        if pairs is None:
            order = rng.permutation(count) if self.shuffle else np.arange(count)
        else:
            order = rng.permutation(pairs) if self.shuffle else pairs
        order = order.astype(np.int32 if count < 2**31 else np.int64)
        # Oversampled copies of a pair have its one length: sorted together they would fill one batch (k
        # times its weight in one step). Each copy layer is bucketed on its own, so that a batch holds a
        # pair once, and the batches of all layers are served in one shuffled order.
        layers = [self._bucket(layer) for layer in (copy_layers(order) if pairs is not None else [order])]
        order, sizes = layers[0]
        if len(layers) > 1:
            order, sizes = (np.concatenate(parts) for parts in zip(*layers, strict=True))
        starts = np.cumsum(sizes) - sizes
        if self.shuffle:
            served = rng.permutation(len(starts))
            starts, sizes = starts[served], sizes[served]
        return BatchPlan(order, starts, sizes)

    def _bucket(self, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``order`` sorted by (source, target) length, stably, and the sizes of the batches cut from it."""
        widest = int(self.tgt_lengths.max(initial=0)) + 1
        keys = int(self.src_lengths.max(initial=0) + 1) * widest  # distinct (source, target) lengths
        key_type = np.uint16 if keys <= 2**16 else np.int64  # 16-bit keys sort by radix, in linear time
        key = (self.src_lengths[order].astype(np.int64) * widest + self.tgt_lengths[order]).astype(key_type)
        order = order[np.argsort(key, kind="stable")]
        # The cut depends only on how many pairs share each (source, target) length.
        pairs_per_key = np.bincount(key, minlength=keys) if keys <= 2**24 else None
        del key
        if pairs_per_key is None:
            lengths, runs = np.unique(
                self.src_lengths[order].astype(np.int64) * widest + self.tgt_lengths[order],
                return_counts=True,
            )
        else:
            lengths = np.flatnonzero(pairs_per_key)
            runs = pairs_per_key[lengths]
        return order, self._cut(lengths // widest, lengths % widest, runs)

    def _cut(self, src_lengths: np.ndarray, tgt_lengths: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        """Batch sizes of the greedy cut of the length-sorted pairs, given as runs of ``pairs`` pairs
        of equal (source, target) length: a batch takes pairs while (its size + 1) x its longest side
        stays within the budget (a pair longer than the budget alone makes a batch)."""
        sizes: list[int] = []
        size = longest = 0
        previous_src = -1
        for src, tgt, left in zip(src_lengths.tolist(), tgt_lengths.tolist(), pairs.tolist(), strict=True):
            if size and self.equal_source_length and src != previous_src:
                sizes.append(size)
                size = longest = 0
            previous_src = src
            while left:
                wider = max(longest, src, tgt, 1)
                room = self.batch_tokens // wider - size
                if size and room < 1:
                    sizes.append(size)
                    size = longest = 0
                    continue
                taken = min(left, max(room, 1))
                size, longest, left = size + taken, wider, left - taken
        if size:
            sizes.append(size)
        return np.asarray(sizes, dtype=np.int64)

    def batches(self, epoch: int) -> list[list[int]]:
        return self.plan(epoch).batches()

    def rank_batch_numbers(self, epoch: int, start: int = 0) -> np.ndarray:
        """Positions in the epoch's plan of this rank's batches from global position ``start`` on:
        ``len(self)`` of them from the start of the epoch, fewer after a resume."""
        per_rank = self.batches_left(start)
        padded = (start + np.arange(per_rank * self.num_replicas)) % max(len(self.plan(epoch)), 1)
        return padded[self.rank :: self.num_replicas]

    def batches_left(self, start: int) -> int:
        """This rank's batches from global position ``start`` of an epoch to its end (every rank's)."""
        return -(-max(self.num_global_batches - start, 0) // self.num_replicas)

    def rank_batches(self, epoch: int) -> list[list[int]]:
        """This rank's share of the epoch's batches, ``len(self)`` of them."""
        plan = self.plan(epoch)
        return [plan.batch(b) for b in self.rank_batch_numbers(epoch)]

    @property
    def repeated_batches(self) -> int:
        """Batches repeated per epoch so that every rank gets the same number."""
        return len(self) * self.num_replicas - self.num_global_batches

    def resume(self, global_batches_done: int) -> None:
        """Make the next iteration start after the first ``global_batches_done`` global batches of its
        epoch, whatever number of ranks trained on them: the ranks now share the rest."""
        self._resume_at = global_batches_done

    def __iter__(self) -> Iterator[list[int]]:
        self.iteration_start, self._resume_at = self._resume_at, 0
        self.served_iteration = False
        epoch = self.epoch_fn()
        plan = self.plan(epoch)
        for b in self.rank_batch_numbers(epoch, self.iteration_start):
            yield plan.batch(b)
        self.served_iteration = True

    def __len__(self) -> int:
        return -(-self.num_global_batches // self.num_replicas)


def copy_layers(order: np.ndarray) -> list[np.ndarray]:
    """``order`` (pair indices, repeats allowed) as its copy layers, each in ``order``'s order: every
    index's first occurrence, then every repeated index's second, and so on; ``[order]`` without repeats."""
    count = len(order)
    by_index = np.argsort(order, kind="stable")
    ranked = order[by_index]
    run_starts = np.ones(count, dtype=bool)
    run_starts[1:] = ranked[1:] != ranked[:-1]
    if run_starts.all():
        return [order]
    # The position of each occurrence among its index's: its distance from the start of its run.
    positions = np.arange(count)
    copy = np.empty(count, dtype=np.int64)
    copy[by_index] = positions - np.maximum.accumulate(np.where(run_starts, positions, 0))
    return [order[copy == c] for c in range(int(copy.max()) + 1)]


class CorpusMixture:
    """Which training pairs make each epoch when several corpora are mixed by weight.

    Corpus c gets ``round(share_c * pairs)`` of an epoch's pairs, where ``share_c`` is its weight over the
    sum of the weights and ``pairs`` the number of training pairs of all corpora: each of its pairs as
    many whole times as that fits, the rest drawn without replacement (so a corpus is undersampled or
    oversampled, never sampled with temperature). The draw is seeded by (seed, epoch): every rank and
    every resumed run draws the same.

    Args:
        corpus_ids: (pairs,) the corpus of each training pair (0 .. len(weights) - 1).
        weights: positive sampling weight of each corpus.
        seed: the data seed.
    """

    def __init__(self, corpus_ids: np.ndarray, weights: Sequence[float], seed: int) -> None:
        self.members = [np.flatnonzero(corpus_ids == c) for c in range(len(weights))]
        shares = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.counts = np.round(shares * len(corpus_ids)).astype(np.int64)
        self.seed = seed

    def draw(self, epoch: int) -> np.ndarray:
        """(sum of counts,) int64: the epoch's pair indices, corpus after corpus."""
        rng = np.random.default_rng([self.seed, epoch, 1])
        parts = []
        for members, count in zip(self.members, self.counts.tolist(), strict=True):
            whole, rest = divmod(count, max(len(members), 1))
            parts += [members] * whole + [rng.choice(members, rest, replace=False)]
        return np.concatenate(parts)


def padding_efficiency(
    src_lengths: np.ndarray, tgt_lengths: np.ndarray, plan: BatchPlan | list[list[int]]
) -> tuple[float, float]:
    """Fraction of real (non-pad) tokens in the padded source and target tensors of the batches."""
    if not isinstance(plan, BatchPlan):
        plan = BatchPlan.from_batches(plan)
    in_place = np.argsort(plan.starts)  # batches in the order they lie in plan.order
    starts, sizes = plan.starts[in_place], plan.sizes[in_place].astype(np.int64)
    fractions = []
    for lengths in (src_lengths, tgt_lengths):
        per_pair = np.asarray(lengths, dtype=np.int64)[plan.order]
        padded = (np.maximum.reduceat(per_pair, starts) * sizes).sum() if len(plan) else 0
        fractions.append(float(per_pair.sum() / max(padded, 1)))
    return fractions[0], fractions[1]


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position in the epoch goes into checkpoints.

    Lightning saves ``state_dict()`` with each checkpoint and, on resuming, calls ``load_state_dict``
    before iterating; the batch sampler then skips the batches already trained on, so a run stopped
    mid-epoch goes on with the next batch of the same epoch order. The position is counted in global
    batches (what all ranks together have trained on), from the trainer's count of processed batches,
    not the loader's (the loader runs ahead of training by its prefetching); so a run resumed with
    another number of ranks goes on exactly where the old ranks stopped. A position saved over another
    epoch plan (other data or batching settings) is refused.

    The trainer ends an epoch when its own count of this rank's batches reaches ``len(self)``, and
    restores that count as the old ranks saved it. ``resume_count_fn`` sets it to what the new ranks
    count for the position: ``len(self)`` less the batches left to each, so that the epoch ends when the
    sampler has served them (with more ranks, the old count ended it early; with fewer, it counted too
    few).

    Args:
        batches_done_fn: the trainer's count of this rank's batches trained in the epoch.
        resume_count_fn: sets that count on resuming.
    """

    def __init__(
        self,
        *args: Any,
        batches_done_fn: Callable[[], int],
        resume_count_fn: Callable[[int], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done_fn = batches_done_fn
        self.resume_count_fn = resume_count_fn
        self._counted_at_resume = 0  # the trainer's count when the resumed iteration starts
        self.counted_before = 0  # the part of the trainer's count that precedes the current iteration

    def __iter__(self) -> Iterator[Any]:
        self.counted_before, self._counted_at_resume = self._counted_at_resume, 0
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        sampler = self.batch_sampler
        counted = self.batches_done_fn()
        done_here = counted - self.counted_before  # by each rank, in this iteration
        position = sampler.iteration_start + done_here * sampler.num_replicas
        if counted == 0 and sampler.served_iteration:  # the trainer closed the epoch: the next one's start
            position = 0
        return {
            "global_batches_done": position,
            "global_batches": sampler.num_global_batches,
            "world_size": sampler.num_replicas,
        }

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        sampler = self.batch_sampler
        if "global_batches_done" not in state_dict:  # saved before the world size was: by as many ranks
            state_dict = {"global_batches_done": state_dict["batches_done"] * sampler.num_replicas}
        done, saved = state_dict["global_batches_done"], state_dict.get("global_batches")
        world_size = state_dict.get("world_size", sampler.num_replicas)
        if done >= world_size * -(-(saved or sampler.num_global_batches) // world_size):
            self.resume_count_fn(len(sampler))  # saved at the end of an epoch: the next starts afresh
            return
        if saved is not None and saved != sampler.num_global_batches:
            raise UserError(
                f"ckpt_path: saved after {done} of the {saved} batches of an epoch, but this run's epoch has"
                f" {sampler.num_global_batches} (other data.* settings); resume with the checkpoint's data"
                " settings, or from a checkpoint saved at the end of an epoch"
            )
        sampler.resume(done)
        self._counted_at_resume = len(sampler) - sampler.batches_left(done)
        self.resume_count_fn(self._counted_at_resume)
