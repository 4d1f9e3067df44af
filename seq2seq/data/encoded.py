"""A split's subword ids as a map-style Dataset (:class:`EncodedSplit`) whose ``collate`` reads a
batch's pairs (from the prepared cache, or from memory) into a padded :class:`~seq2seq.data.collate.Batch`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from seq2seq.data.collate import Batch
from seq2seq.data.prepared.format import RaggedIds
from seq2seq.tokenization import BOS_ID, EOS_ID


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
