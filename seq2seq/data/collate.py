"""Collation: a split's ids (:class:`EncodedSplit`) into padded :class:`Batch` tensors, and the length-sorted
batches of inference (translation keeps its input order; see :func:`length_sorted_batches`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from seq2seq.data.prepared.cache import RaggedIds
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


def ids_batch(src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]], indices: Sequence[int]) -> Batch:
    """The :class:`Batch` of pairs segmented on the fly (lists of ids); :meth:`EncodedSplit.collate`
    builds the same from the prepared cache, without Python lists."""
    return Batch(
        src=pad(src),
        src_lengths=torch.tensor([len(ids) for ids in src], dtype=torch.long),
        tgt_in=pad(tgt, prefix=BOS_ID),
        tgt_out=pad(tgt, suffix=EOS_ID),
        indices=torch.tensor(indices, dtype=torch.long),
        num_target_tokens=sum(len(ids) + 1 for ids in tgt),  # EOS included
    )


def batch_size(batch: Batch) -> int:
    """Sentence pairs in a batch (for Lightning's ThroughputMonitor)."""
    return batch.src.size(0)


def target_tokens(batch: Batch) -> int:
    """Real target tokens in a batch, EOS included (for Lightning's ThroughputMonitor)."""
    return batch.num_target_tokens


def length_sorted_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Positions of ``lengths`` in batches of similar length for inference: sorted by length (stable, so
    equal lengths keep their order) and cut greedily so that batch size x longest length stays within
    ``budget`` (a sequence longer than the budget makes a batch alone). The caller puts results back in
    input order by position.
    """
    order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable").tolist()
    batches: list[list[int]] = []
    batch: list[int] = []
    longest = 0
    for position in order:
        wider = max(longest, lengths[position], 1)
        if batch and (len(batch) + 1) * wider > budget:
            batches.append(batch)
            batch, wider = [], max(lengths[position], 1)
        batch.append(position)
        longest = wider
    if batch:
        batches.append(batch)
    return batches
