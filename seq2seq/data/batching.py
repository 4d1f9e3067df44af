"""Encoded splits, padded batches, and the token-budget batch sampler with length bucketing.

Everything here works on numpy arrays: a split's lengths, from which an epoch's batches are planned
with a few vectorized sorts, and its ids, read a batch at a time from the prepared cache in training
runs, so that a split of 10M pairs costs a process 8 bytes a pair, its DataLoader workers and DDP
processes no private copy of the ids.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from seq2seq.tokenization import BOS_ID, EOS_ID, PAD_ID

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """A padded batch of sentence pairs.

    src: (batch, src_len) source ids, padded with PAD_ID.
    src_lengths: (batch,) true source lengths (CPU, as packing wants them).
    tgt_in: (batch, tgt_len) BOS + target ids, the decoder's teacher-forced input.
    tgt_out: (batch, tgt_len) target ids + EOS, what the decoder must predict; PAD_ID where padded.
    indices: (batch,) positions of the pairs in their split, to find their raw text (CPU).
    num_target_tokens: real (non-pad) positions of ``tgt_out``, counted when the batch is built, so
        that training never asks the device for it.
    """

    src: Tensor
    src_lengths: Tensor
    tgt_in: Tensor
    tgt_out: Tensor
    indices: Tensor
    num_target_tokens: int

    def pin_memory(self) -> Batch:
        """Page-locked copies (DataLoader ``pin_memory=True``), so copies to the GPU need not wait."""
        pinned = {name: getattr(self, name).pin_memory() for name in ("src", "tgt_in", "tgt_out")}
        return replace(self, **pinned)


def pad(sequences: Sequence[Sequence[int]], prefix: int | None = None, suffix: int | None = None) -> Tensor:
    """Stack id lists into a (len(sequences), max_len) tensor, adding optional BOS/EOS-like ids."""
    extra = (prefix is not None) + (suffix is not None)
    out = torch.full((len(sequences), max(map(len, sequences)) + extra), PAD_ID, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids = ([prefix] if prefix is not None else []) + list(seq) + ([suffix] if suffix is not None else [])
        out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def every_nth(path: Path, count: int, n: int, chunk: int = 1 << 20) -> np.ndarray:
    """Values 0, n, 2n, ... of the ``count`` int64 values in ``path``, read a chunk at a time."""
    chunk -= chunk % n  # so that each chunk starts at a multiple of n
    parts = []
    with path.open("rb") as stream:
        for first in range(0, count, chunk):
            values = np.fromfile(stream, np.int64, count=min(chunk, count - first))
            if len(values) < min(chunk, count - first):
                raise ValueError(f"{path}: {first + len(values)} values, expected {count}")
            parts.append(values[::n])
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def memory_available() -> int | None:
    """Bytes the OS could give without swapping (``MemAvailable``), or None where it does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def read_ahead(paths: list[Path], available: int | None) -> threading.Thread | None:
    """Read ``paths`` once, in a background thread, so that the OS page cache holds them.

    Batches read their sequences at random places; from a cold page cache each read waits on the disk
    (150 batches/s instead of 1,900 at 10M pairs here, worse on network file systems), while one
    sequential read fills the cache at the disk's full speed (4 s for 1.9 GB here). Skipped (None)
    unless the files fit in half the ``available`` memory: reading more would evict what it read.
    """
    if not paths or available is None:
        return None
    size = sum(path.stat().st_size for path in paths)
    if size > available // 2:
        log.info(
            "Not reading the training ids (%.0f MB) ahead: more than half the memory available (%.0f MB)",
            size / 1e6, available / 1e6,
        )  # fmt: skip
        return None

    def read() -> None:
        started = time.perf_counter()
        buffer = bytearray(1 << 24)
        for path in paths:
            with path.open("rb", buffering=0) as stream:
                while stream.readinto(buffer):  # the GIL is released while the OS reads
                    pass
        log.info(
            "Training ids (%.0f MB) in the page cache after %.1f s", size / 1e6, time.perf_counter() - started
        )

    thread = threading.Thread(target=read, name="read-ahead", daemon=True)
    thread.start()
    return thread


class RaggedIds:
    """Id sequences of varying length stored flat: sequence i is ``ids[offsets[i]:offsets[i + 1]]``.

    Either in memory (:meth:`from_lists`) or in a prepared cache folder (:meth:`open`). From the cache,
    each sequence is read with ``pread``: from the OS page cache, which every process shares (DDP ranks,
    DataLoader workers, later runs), without mapping the file into this process. A memory map made each
    process's unique memory grow with the cache pages it had touched (the kernel maps whole page-cache
    folios, up to megabytes, per read). In memory are only the lengths (4 bytes a sequence) and every
    ``BLOCK``-th offset: a sequence starts at its block's offset plus the lengths before it in the block.
    Pickling one read from the cache (for spawned DataLoader workers) sends where it is, not the data.
    """

    BLOCK = 64

    def __init__(
        self,
        lengths: np.ndarray,
        block_offsets: np.ndarray,
        ids: np.ndarray | None,
        source: tuple | None = None,
    ) -> None:
        self.lengths, self.block_offsets, self.ids, self.source = lengths, block_offsets, ids, source
        if ids is None:  # read from the cache: source is (folder, name, id_type, count, tokens)
            folder, name, id_type, _, tokens = source
            self.path = folder / f"{name}.ids"
            self.id_type = np.dtype(id_type)
            self.file = self.path.open("rb")  # pread needs no seek: forked workers may share it
            size = os.fstat(self.file.fileno()).st_size
            if size != tokens * self.id_type.itemsize:
                raise ValueError(f"{self.path}: {size} bytes, expected {tokens} ids of {self.id_type}")

    @classmethod
    def from_lists(cls, sequences: Sequence[Sequence[int]]) -> RaggedIds:
        lengths = np.fromiter(map(len, sequences), dtype=np.int32, count=len(sequences))
        ids = np.fromiter((i for seq in sequences for i in seq), dtype=np.int32, count=int(lengths.sum()))
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        return cls(lengths, offsets[:: cls.BLOCK].copy(), ids)

    @classmethod
    def open(cls, folder: Path, name: str, id_type: np.dtype, count: int, tokens: int) -> RaggedIds:
        """The ``count`` sequences (``tokens`` ids) of ``name`` in a prepared cache folder."""
        lengths = np.fromfile(folder / f"{name}.lengths", np.int32, count=count)
        if len(lengths) != count:
            raise ValueError(f"{folder / name}.lengths: {len(lengths)} lengths, expected {count}")
        block_offsets = every_nth(folder / f"{name}.offsets", count + 1, cls.BLOCK)
        return cls(lengths, block_offsets, None, source=(folder, name, id_type, count, tokens))

    def __len__(self) -> int:
        return len(self.lengths)

    def starts(self, indices: np.ndarray) -> np.ndarray:
        """(len(indices),) int64: where each sequence's ids begin in the flat array."""
        indices = np.asarray(indices, dtype=np.int64)
        first = indices - indices % self.BLOCK
        columns = np.arange(self.BLOCK)
        block = np.minimum(first[:, None] + columns, len(self.lengths) - 1)  # past the end: masked below
        before = np.where(columns < (indices - first)[:, None], self.lengths[block], 0).sum(axis=1)
        return self.block_offsets[indices // self.BLOCK] + before

    def read(self, start: int, length: int) -> np.ndarray:
        """The ``length`` ids from position ``start`` of the flat array."""
        if self.ids is not None:
            return self.ids[start : start + length]
        size = self.id_type.itemsize
        data = os.pread(self.file.fileno(), length * size, start * size)
        if len(data) != length * size:
            raise ValueError(f"{self.path}: ended before id {start + length} (the file changed?)")
        return np.frombuffer(data, self.id_type)

    def __getitem__(self, index: int) -> list[int]:
        return self.read(int(self.starts(np.array([index]))[0]), int(self.lengths[index])).tolist()

    def padded(self, indices: np.ndarray, width: int) -> np.ndarray:
        """(len(indices), width) int64 ids of the given sequences, PAD_ID after each one's end."""
        out = np.full((len(indices), width), PAD_ID, dtype=np.int64)
        lengths = self.lengths[indices].tolist()
        for row, (start, length) in enumerate(zip(self.starts(indices).tolist(), lengths, strict=True)):
            out[row, :length] = self.read(start, length)
        return out

    def __getstate__(self) -> dict[str, Any]:
        if self.source is None:
            return self.__dict__
        return {"source": self.source}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "ids" in state:
            self.__dict__.update(state)
        else:
            self.__dict__.update(RaggedIds.open(*state["source"]).__dict__)


class EncodedSplit(Dataset):
    """Subword ids of one split. Items are indices; :meth:`collate` builds the padded :class:`Batch`.

    ``src_ids`` and ``tgt_ids`` are :class:`RaggedIds` (lists of id lists are converted).
    """

    def __init__(
        self, src_ids: RaggedIds | Sequence[Sequence[int]], tgt_ids: RaggedIds | Sequence[Sequence[int]]
    ):
        self.src_ids = src_ids if isinstance(src_ids, RaggedIds) else RaggedIds.from_lists(src_ids)
        self.tgt_ids = tgt_ids if isinstance(tgt_ids, RaggedIds) else RaggedIds.from_lists(tgt_ids)
        if len(self.src_ids) != len(self.tgt_ids):
            raise ValueError(f"{len(self.src_ids)} source but {len(self.tgt_ids)} target sequences")

    def __len__(self) -> int:
        return len(self.src_ids)

    def cache_files(self) -> list[Path]:
        """The files the ids are read from: none when they are in memory."""
        return [ids.path for ids in (self.src_ids, self.tgt_ids) if ids.ids is None]

    def __getitem__(self, index: int) -> int:
        return index

    def __getitems__(self, indices: list[int]) -> list[int]:
        return indices  # the DataLoader hands the batch's indices to collate as they are

    def src_lengths(self) -> np.ndarray:
        return self.src_ids.lengths

    def tgt_lengths(self) -> np.ndarray:
        """Target lengths as the decoder sees them: with BOS (input) or EOS (output)."""
        return self.tgt_ids.lengths + 1

    def collate(self, indices: Sequence[int]) -> Batch:
        rows = np.asarray(indices, dtype=np.int64)
        src_lengths = np.asarray(self.src_ids.lengths[rows], dtype=np.int64)
        tgt_lengths = np.asarray(self.tgt_ids.lengths[rows], dtype=np.int64)
        tgt = self.tgt_ids.padded(rows, int(tgt_lengths.max()) + 1)
        tgt_in = np.roll(tgt, 1, axis=1)
        tgt_in[:, 0] = BOS_ID
        tgt[np.arange(len(rows)), tgt_lengths] = EOS_ID
        return Batch(
            src=torch.from_numpy(self.src_ids.padded(rows, int(src_lengths.max()))),
            src_lengths=torch.from_numpy(src_lengths),
            tgt_in=torch.from_numpy(tgt_in),
            tgt_out=torch.from_numpy(tgt),
            indices=torch.from_numpy(rows),
            num_target_tokens=int(tgt_lengths.sum()) + len(rows),  # EOS included
        )

    def padding_efficiency(self, plan: BatchPlan | list[list[int]]) -> tuple[float, float]:
        """Fraction of real (non-pad) tokens in the padded source and target tensors of the batches."""
        if not isinstance(plan, BatchPlan):
            plan = BatchPlan.from_batches(plan)
        in_place = np.argsort(plan.starts)  # batches in the order they lie in plan.order
        starts, sizes = plan.starts[in_place], plan.sizes[in_place].astype(np.int64)
        fractions = []
        for lengths in (self.src_lengths(), self.tgt_lengths()):
            per_pair = np.asarray(lengths, dtype=np.int64)[plan.order]
            padded = (np.maximum.reduceat(per_pair, starts) * sizes).sum() if len(plan) else 0
            fractions.append(float(per_pair.sum() / max(padded, 1)))
        return fractions[0], fractions[1]


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
    ranks. :meth:`resume` skips the batches that a resumed run has already trained on in the current
    epoch.
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
    ) -> None:
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        # Memory-mapped lengths stay mapped: no private copy per process.
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
        self._plans: dict[int, BatchPlan] = {}  # the last epoch's plan, planned once
        # Every epoch sorts the same lengths, so the number of batches never changes.
        self.num_global_batches = len(self.plan(0))
        self._skip = 0  # batches of the next epoch to skip, set by resume()

    def plan(self, epoch: int) -> BatchPlan:
        """The epoch's global batches, in the order they are served."""
        if epoch not in self._plans:
            self._plans = {epoch: self._plan(epoch)}
        return self._plans[epoch]

    def _plan(self, epoch: int) -> BatchPlan:
        rng = np.random.default_rng([self.seed, epoch])
        count = len(self.src_lengths)
        widest = int(self.tgt_lengths.max(initial=0)) + 1
        keys = int(self.src_lengths.max(initial=0) + 1) * widest  # distinct (source, target) lengths
        key_type = np.uint16 if keys <= 2**16 else np.int64  # 16-bit keys sort by radix, in linear time
        # Sorting a random permutation stably breaks ties at random.
        order = rng.permutation(count) if self.shuffle else np.arange(count)
        order = order.astype(np.int32 if count < 2**31 else np.int64)
        key = (self.src_lengths[order].astype(np.int64) * widest + self.tgt_lengths[order]).astype(key_type)
        order = order[np.argsort(key, kind="stable")]
        # The cut depends only on how many pairs share each (source, target) length.
        pairs_per_key = np.bincount(key, minlength=keys) if keys <= 2**24 else None
        del key
        if pairs_per_key is None:
            lengths, pairs = np.unique(
                self.src_lengths.astype(np.int64) * widest + self.tgt_lengths, return_counts=True
            )
        else:
            lengths = np.flatnonzero(pairs_per_key)
            pairs = pairs_per_key[lengths]
        sizes = self._cut(lengths // widest, lengths % widest, pairs)
        starts = np.cumsum(sizes) - sizes
        if self.shuffle:
            served = rng.permutation(len(starts))
            starts, sizes = starts[served], sizes[served]
        return BatchPlan(order, starts, sizes)

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

    def rank_batch_numbers(self, epoch: int) -> np.ndarray:
        """Positions in the epoch's plan of this rank's ``len(self)`` batches."""
        padded = np.arange(len(self) * self.num_replicas) % max(self.num_global_batches, 1)
        return padded[self.rank :: self.num_replicas]

    def rank_batches(self, epoch: int) -> list[list[int]]:
        """This rank's share of the epoch's batches, ``len(self)`` of them."""
        plan = self.plan(epoch)
        return [plan.batch(b) for b in self.rank_batch_numbers(epoch)]

    @property
    def repeated_batches(self) -> int:
        """Batches repeated per epoch so that every rank gets the same number."""
        return len(self) * self.num_replicas - self.num_global_batches

    def resume(self, batches_done: int) -> None:
        """Make the next iteration start after the first ``batches_done`` batches of its epoch."""
        self._skip = batches_done

    def __iter__(self) -> Iterator[list[int]]:
        skip, self._skip = self._skip, 0
        epoch = self.epoch_fn()
        plan = self.plan(epoch)
        for b in self.rank_batch_numbers(epoch)[skip:]:
            yield plan.batch(b)

    def __len__(self) -> int:
        return -(-self.num_global_batches // self.num_replicas)


def batch_size(batch: Batch) -> int:
    """Sentence pairs in a batch (for Lightning's ThroughputMonitor)."""
    return batch.src.size(0)


def target_tokens(batch: Batch) -> int:
    """Real target tokens in a batch, EOS included (for Lightning's ThroughputMonitor)."""
    return batch.num_target_tokens
