"""Translate sentences with a trained model: the Python API behind ``translate.py`` and test scoring."""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from seq2seq.data.batching import TokenBucketBatchSampler, pad
from seq2seq.model import Seq2Seq
from seq2seq.search import Hypothesis, beam_search, greedy_search
from seq2seq.tokenization import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchSettings:
    """How to decode. ``beam=1`` is greedy search; ``nbest`` needs ``nbest <= beam``."""

    beam: int = 5
    alpha: float = 0.6
    max_len_a: float = 1.5
    max_len_b: int = 10
    min_len: int = 0
    nbest: int = 1

    def __post_init__(self) -> None:
        if self.beam < 1:
            raise ValueError(f"beam must be at least 1, got {self.beam}")
        if not 1 <= self.nbest <= self.beam:
            raise ValueError(f"nbest must be between 1 and beam={self.beam}, got {self.nbest}")
        if self.min_len < 0 or self.max_len_a < 0:
            raise ValueError("min_len and max_len_a must not be negative")


class Translator:
    """Batched translation that keeps the input's order and length.

    Every input sentence gives exactly one output (or ``nbest`` outputs): a blank input gives an empty
    translation, and an input longer than ``max_src_len`` subwords is truncated with a warning.
    """

    def __init__(
        self, model: Seq2Seq, tokenizer: Tokenizer, max_src_len: int, device: str | torch.device = "cpu"
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.max_src_len = max_src_len

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> Translator:
        """Load a ``.ckpt`` written by training; it holds the weights, tokenizer and configuration."""
        from seq2seq.module import TranslationModule  # the Lightning side stays out of plain use

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Checkpoint not found: {path}")
        try:
            module = TranslationModule.load_from_checkpoint(path, map_location=device, weights_only=False)
        except (RuntimeError, KeyError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
            raise ValueError(f"Cannot load checkpoint {path}: not a complete checkpoint of this toolkit ({err})") from None
        run_config = module.run_config or {}
        max_src_len = run_config.get("data", {}).get("max_len", 256)
        return cls(module.model, module.tokenizer, max_src_len, device)

    def translate(self, sentences: Sequence[str], beam: int = 5, batch_tokens: int = 4000, first_line: int = 1,
                  **options: float) -> list[str]:
        """Translate ``sentences`` into as many strings, in order.

        ``options`` are the other :class:`SearchSettings` fields (``alpha``, ``max_len_a``, ...).
        """
        settings = SearchSettings(beam=beam, **options)
        return [hyps[0][0] for hyps in self.translate_nbest(sentences, settings, batch_tokens, first_line)]

    def translate_nbest(self, sentences: Sequence[str], settings: SearchSettings, batch_tokens: int = 4000,
                        first_line: int = 1) -> list[list[tuple[str, Hypothesis]]]:
        """Per sentence, its ``settings.nbest`` best (text, hypothesis) pairs, best first.

        ``first_line`` is the line number of ``sentences[0]`` in its file, for warnings.
        """
        results = self._hypotheses(sentences, settings, batch_tokens, first_line)
        texts = iter(self.tokenizer.decode_tgt([h.tokens for hyps in results for h in hyps]))
        return [[(next(texts), h) for h in hyps] for hyps in results]

    def _hypotheses(self, sentences: Sequence[str], settings: SearchSettings, batch_tokens: int,
                    first_line: int) -> list[list[Hypothesis]]:
        ids = self.tokenizer.encode_src([s.strip() for s in sentences])
        results: list[list[Hypothesis]] = [[Hypothesis([], 0.0, 0.0)] * settings.nbest for _ in sentences]
        todo = [i for i, seq in enumerate(ids) if seq]
        for i in todo:
            if len(ids[i]) > self.max_src_len:
                log.warning(
                    "input line %d: %d subwords, truncated to the model's maximum of %d",
                    first_line + i, len(ids[i]), self.max_src_len,
                )  # fmt: skip
                ids[i] = ids[i][: self.max_src_len]
        # Beams multiply the rows of a batch, so the budget of source tokens shrinks with the beam.
        budget = max(batch_tokens // settings.beam, self.max_src_len)
        sampler = TokenBucketBatchSampler([len(ids[i]) for i in todo], None, budget, shuffle=False)
        for batch in sampler.batches(epoch=0):
            rows = [todo[b] for b in batch]
            src = pad([ids[i] for i in rows]).to(self.device)
            lengths = torch.tensor([len(ids[i]) for i in rows])
            for row, hyps in zip(rows, self._search(src, lengths, settings), strict=True):
                results[row] = hyps
        return results

    def _search(self, src: torch.Tensor, lengths: torch.Tensor, settings: SearchSettings) -> list[list[Hypothesis]]:
        limits = {"max_len_a": settings.max_len_a, "max_len_b": settings.max_len_b}
        if settings.beam == 1 and settings.min_len == 0:
            return [[h] for h in greedy_search(self.model, src, lengths, **limits)]
        return beam_search(
            self.model, src, lengths, settings.beam, settings.alpha, min_len=settings.min_len,
            nbest=settings.nbest, **limits,
        )  # fmt: skip
