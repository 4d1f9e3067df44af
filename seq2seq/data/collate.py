"""Batches: id lists padded into :class:`Batch` tensors (:func:`pad`, :func:`ids_batch`), what Lightning's
throughput monitor counts of a batch, and the length-sorted batches of inference (translation keeps its
input order; see :func:`length_sorted_batches`). A prepared split's batches are collated by
:class:`seq2seq.data.encoded.EncodedSplit`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

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


def ids_batch(src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]], indices: Sequence[int]) -> Batch:
    """The :class:`Batch` of pairs segmented on the fly (lists of ids); ``EncodedSplit.collate``
    (:mod:`seq2seq.data.encoded`) builds the same from the prepared cache, without Python lists."""
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
