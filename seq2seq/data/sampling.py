"""Subword regularization (Kudo, 2018): each time a training pair is batched, sentencepiece samples a new
segmentation of its text (``data.subword_sampling``), so the model sees a different segmentation of each
sentence every epoch.

It needs the training text, which the prepared cache does not keep: read from memory for the corpora
held there (the Bible, synthetic tasks), and line by line from the files otherwise (their line offsets
are indexed once, at setup). The cache's ids still plan the batches (so batches are cut as without
sampling; a sampled segmentation is usually a little longer) and stand in for a sampled side longer
than ``data.max_len``. Off, training reads the cache alone, the fast path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
from torch.utils.data import Dataset

from seq2seq.data.collate import Batch, ids_batch
from seq2seq.data.corpora import ParallelFiles, ParallelText
from seq2seq.data.encoded import EncodedSplit
from seq2seq.data.sampler import TokenBucketBatchSampler
from seq2seq.errors import UserError
from seq2seq.tokenization import Tokenizer


@dataclass(frozen=True)
class SamplingSettings:
    """sentencepiece's sampling options: ``alpha`` (the unigram model's smoothing, or BPE-dropout's
    rate) and ``nbest`` (sample among the n best segmentations; -1: all, unigram models only)."""

    alpha: float = 0.1
    nbest: int = -1

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise UserError(f"data.subword_sampling.alpha must be in (0, 1], got {self.alpha}")
        if self.nbest != -1 and self.nbest < 2:
            raise UserError(f"data.subword_sampling.nbest must be -1 (all) or at least 2, got {self.nbest}")


class FileLines:
    """Lines of a UTF-8 file by number, read in place: the byte offset of every line is indexed once.

    Lines are as :func:`~seq2seq.data.text.read_text_lines` gives them (no line ending, no leading
    byte-order mark). The file is opened anew in each process that reads (DataLoader workers too).
    """

    def __init__(self, path: Path, chunk: int = 1 << 24) -> None:
        self.path = path
        starts = [np.zeros(1, dtype=np.int64)]
        with path.open("rb") as stream:
            position = 0
            while block := stream.read(chunk):
                newlines = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
                starts.append(newlines.astype(np.int64) + position + 1)
                position += len(block)
        self.starts = np.concatenate(starts)
        if self.starts[-1] == position:  # the last line ends with a newline: no line starts there
            self.starts = self.starts[:-1]
        self.ends = np.append(self.starts[1:], position)
        self._stream = None

    def __getitem__(self, line: int) -> str:
        if self._stream is None:
            self._stream = self.path.open("rb")
        self._stream.seek(int(self.starts[line]))
        text = self._stream.read(int(self.ends[line] - self.starts[line])).decode("utf-8")
        if line == 0:
            text = text.removeprefix("\ufeff")
        return text.removesuffix("\n").removesuffix("\r")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_stream": None}  # each process opens its own


class ResampledSplit(Dataset):
    """The training split, segmented anew each time a batch is read.

    Items are indices into the kept pairs (as in :class:`EncodedSplit`, whose ids give the batch plan);
    the batch sampler yields ``(epoch, indices)`` and :meth:`collate` samples each pair's segmentation
    with sentencepiece seeded by (``seed``, epoch, the batch's pairs), so a batch is segmented the same
    way whichever process or worker builds it, and a resumed run gets the same segmentations.

    Args:
        encoded: the split's cached ids (the best segmentation of each kept pair).
        text: the raw training text: in memory (aligned with the kept pairs), or the files of the split
            with ``kept``, the line of each kept pair.
    """

    def __init__(
        self,
        encoded: EncodedSplit,
        text: ParallelText | ParallelFiles,
        kept: np.ndarray,
        tokenizer: Tokenizer,
        settings: SamplingSettings,
        max_len: int,
        seed: int,
    ) -> None:
        self.encoded = encoded
        if isinstance(text, ParallelText):
            self.src_lines: Sequence[str] = text.src
            self.tgt_lines: Sequence[str] = text.tgt
            self.lines_of = np.arange(len(text))
        else:
            self.src_lines, self.tgt_lines = FileLines(text.src_path), FileLines(text.tgt_path)
            self.lines_of = kept
        self.tokenizer, self.settings = tokenizer, settings
        self.max_len, self.seed = max_len, seed

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitems__(self, key: tuple[int, list[int]]) -> tuple[int, list[int]]:
        return key  # collate reads the text

    def collate(self, key: tuple[int, list[int]]) -> Batch:
        epoch, indices = key
        seed = np.random.SeedSequence([self.seed, epoch, *indices]).generate_state(1)[0]
        spm.set_random_generator_seed(int(seed))
        lines = self.lines_of[indices].tolist()
        sides = []
        for processor, text, cached in (
            (self.tokenizer.src, self.src_lines, self.encoded.src_ids),
            (self.tokenizer.tgt, self.tgt_lines, self.encoded.tgt_ids),
        ):
            sampled = processor.encode(
                [text[line] for line in lines],
                enable_sampling=True,
                alpha=self.settings.alpha,
                nbest_size=self.settings.nbest,
                num_threads=1,  # each thread has its own generator, seeded once: one thread, reproducible
            )
            # A sampled side longer than the limit (or empty) takes the cached segmentation instead.
            kept = [
                ids if 0 < len(ids) <= self.max_len else cached[i]
                for ids, i in zip(sampled, indices, strict=True)
            ]
            sides.append(kept)
        return ids_batch(sides[0], sides[1], indices)


class EpochTaggedSampler(TokenBucketBatchSampler):
    """The training batch sampler, yielding each batch as ``(epoch, indices)`` for :class:`ResampledSplit`."""

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        epoch = self.epoch_fn()
        for batch in super().__iter__():
            yield epoch, batch
