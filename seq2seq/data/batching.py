"""Encoded splits, padded batches, and the token-budget batch sampler with length bucketing."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from seq2seq.tokenization import BOS_ID, EOS_ID, PAD_ID


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


class EncodedSplit(Dataset):
    """Subword ids of one split. Items are indices; :meth:`collate` builds the padded :class:`Batch`."""

    def __init__(self, src_ids: list[list[int]], tgt_ids: list[list[int]]) -> None:
        self.src_ids = src_ids
        self.tgt_ids = tgt_ids

    def __len__(self) -> int:
        return len(self.src_ids)

    def __getitem__(self, index: int) -> int:
        return index

    def src_lengths(self) -> list[int]:
        return [len(s) for s in self.src_ids]

    def tgt_lengths(self) -> list[int]:
        """Target lengths as the decoder sees them: with BOS (input) or EOS (output)."""
        return [len(t) + 1 for t in self.tgt_ids]

    def collate(self, indices: list[int]) -> Batch:
        src = [self.src_ids[i] for i in indices]
        tgt = [self.tgt_ids[i] for i in indices]
        return Batch(
            src=pad(src),
            src_lengths=torch.tensor([len(s) for s in src], dtype=torch.long),
            tgt_in=pad(tgt, prefix=BOS_ID),
            tgt_out=pad(tgt, suffix=EOS_ID),
            indices=torch.tensor(indices, dtype=torch.long),
            num_target_tokens=sum(map(len, tgt)) + len(tgt),  # EOS included
        )

    def padding_efficiency(self, batches: list[list[int]]) -> tuple[float, float]:
        """Fraction of real (non-pad) tokens in the padded source and target tensors of ``batches``."""
        real_src = real_tgt = padded_src = padded_tgt = 0
        for batch in batches:
            src_lens = [len(self.src_ids[i]) for i in batch]
            tgt_lens = [len(self.tgt_ids[i]) + 1 for i in batch]
            real_src, real_tgt = real_src + sum(src_lens), real_tgt + sum(tgt_lens)
            padded_src += len(batch) * max(src_lens)
            padded_tgt += len(batch) * max(tgt_lens)
        return real_src / max(padded_src, 1), real_tgt / max(padded_tgt, 1)


class TokenBucketBatchSampler(Sampler[list[int]]):
    """Batches of similar-length pairs whose padded size stays within ``batch_tokens``.

    Pairs are sorted by source then target length (ties broken at random when shuffling) and cut
    into batches of at most ``batch_tokens`` padded tokens (batch size x longest side); with
    ``shuffle`` the batch order is shuffled too. With ``equal_source_length`` a batch never mixes
    source lengths, so its source needs no padding and the encoder no packing (much faster on CPU).
    The order is a pure function of ``seed`` and the epoch, read from ``epoch_fn`` when iteration
    starts, so a run resumed at an epoch sees that epoch's order.

    Under data parallelism every rank builds the same global batches and takes every
    ``num_replicas``-th one from ``rank`` on. The list is first padded by repeating it cyclically to a
    multiple of ``num_replicas`` (even with fewer batches than ranks), so every rank gets the same number
    of batches (a rank with one batch fewer would wait forever in the gradient all-reduce).
    :meth:`resume` skips the batches that a resumed run has already trained on in the current epoch.
    """

    def __init__(
        self,
        src_lengths: Sequence[int],
        tgt_lengths: Sequence[int] | None,
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
        self.src_lengths = list(src_lengths)
        self.tgt_lengths = list(tgt_lengths) if tgt_lengths is not None else [0] * len(self.src_lengths)
        self.batch_tokens = batch_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.epoch_fn = epoch_fn
        self.equal_source_length = equal_source_length
        self.num_replicas = num_replicas
        self.rank = rank
        # Every epoch sorts the same lengths, so the number of batches never changes.
        self.num_global_batches = len(self.batches(0))
        self._skip = 0  # batches of the next epoch to skip, set by resume()

    def batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 100_003 + epoch)
        count = len(self.src_lengths)
        tie_break = [rng.random() for _ in range(count)] if self.shuffle else range(count)
        order = sorted(range(count), key=lambda i: (self.src_lengths[i], self.tgt_lengths[i], tie_break[i]))
        batches: list[list[int]] = []
        current: list[int] = []
        longest = 0
        for index in order:
            length = max(self.src_lengths[index], self.tgt_lengths[index])
            new_source_length = current and self.src_lengths[index] != self.src_lengths[current[-1]]
            if current and (
                (len(current) + 1) * max(longest, length) > self.batch_tokens
                or (self.equal_source_length and new_source_length)
            ):
                batches.append(current)
                current, longest = [], 0
            current.append(index)
            longest = max(longest, length)
        if current:
            batches.append(current)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def rank_batches(self, epoch: int) -> list[list[int]]:
        """This rank's share of the epoch's batches, ``len(self)`` of them."""
        batches = self.batches(epoch)
        # Cyclic repeats: even 3 batches on 8 ranks give every rank one.
        padded = [batches[i % len(batches)] for i in range(len(self) * self.num_replicas)]
        return padded[self.rank :: self.num_replicas]

    @property
    def repeated_batches(self) -> int:
        """Batches repeated per epoch so that every rank gets the same number."""
        return len(self) * self.num_replicas - self.num_global_batches

    def resume(self, batches_done: int) -> None:
        """Make the next iteration start after the first ``batches_done`` batches of its epoch."""
        self._skip = batches_done

    def __iter__(self) -> Iterator[list[int]]:
        skip, self._skip = self._skip, 0
        yield from self.rank_batches(self.epoch_fn())[skip:]

    def __len__(self) -> int:
        return -(-self.num_global_batches // self.num_replicas)


def batch_size(batch: Batch) -> int:
    """Sentence pairs in a batch (for Lightning's ThroughputMonitor)."""
    return batch.src.size(0)


def target_tokens(batch: Batch) -> int:
    """Real target tokens in a batch, EOS included (for Lightning's ThroughputMonitor)."""
    return batch.num_target_tokens
