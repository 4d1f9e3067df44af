"""The served model: one :class:`~seq2seq.translator.Translator`, loaded once, behind the batcher.

Every translation goes through :meth:`Translator.translate_nbest` with the same decoding settings
translate.py builds (``DecodingSettings`` from the command line, a request's keys in place), so each
line's answer is what translate.py writes for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from seq2seq.decoding import DecodingSettings
from seq2seq.serve.batching import Batcher
from seq2seq.serve.info import has_attention, language_pair, model_info
from seq2seq.serve.protocol import Job, Limits, RequestError
from seq2seq.translator import Alignment, Translator


@dataclass(frozen=True)
class Translation:
    """One line's answer: its n-best (text, score, log-probability), best first, and the attention of
    the best one when asked."""

    hypotheses: list[tuple[str, float, float]]
    alignment: Alignment | None = None

    @property
    def text(self) -> str:
        return self.hypotheses[0][0]

    def nbest_json(self) -> list[dict[str, Any]]:
        return [{"text": t, "score": s, "log_prob": p} for t, s, p in self.hypotheses]

    def attention_json(self) -> dict[str, Any]:
        """Source pieces across, target pieces (the end of sentence last) down: ``weights[i][j]``."""
        alignment = self.alignment
        assert alignment is not None
        return {"source": alignment.source, "target": alignment.target, "weights": alignment.weights.tolist()}


class TranslationService:
    """The translator, the server's decoding defaults and limits, and the batcher in front of them;
    ``thread`` is the :func:`~seq2seq.serve.batching.decoding_thread` that loaded the translator, and a
    round decodes up to ``round_batches`` translator batches."""

    def __init__(
        self,
        paths: list[str],
        translator: Translator,
        defaults: DecodingSettings,
        limits: Limits,
        window: float,
        round_batches: int,
        thread: ThreadPoolExecutor,
        languages: tuple[str | None, str | None] = (None, None),
    ) -> None:
        self.translator = translator
        self.round_batches = round_batches
        self.thread = thread
        self.defaults = defaults
        self.limits = limits
        self.window = window
        self.languages = language_pair(translator, *languages)
        self.attention = has_attention(translator)
        self.info = model_info(paths, translator, defaults, self.languages)
        self.batcher: Batcher[Translation] | None = None

    def start(self) -> None:
        """Start the decoding task (in the server's event loop)."""
        self.batcher = Batcher(self.decode, self.costs, self.round_tokens, self.window, self.thread)
        self.batcher.start()

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()

    @property
    def ready(self) -> bool:
        return self.batcher is not None and self.batcher.alive

    async def translate(self, job: Job) -> list[Translation]:
        """The job's lines translated, in order (through the batcher)."""
        if job.attention and not self.attention:
            raise RequestError(
                400,
                "attention needs a single model trained with attention (model.attention); this is not one",
            )
        assert self.batcher is not None
        return await self.batcher.translate(job.lines, job.settings, job.attention)

    def decode(
        self, lines: list[str], settings: DecodingSettings, attention: list[bool]
    ) -> list[Translation]:
        """Translate ``lines`` as translate.py does (in the decoding thread); the attention of
        the lines flagged in ``attention``."""
        results = self.translator.translate_nbest(lines, settings)
        return [
            Translation(
                [(text, h.score, h.log_prob) for text, h in hyps],
                self.translator.align(line, settings) if wanted else None,
            )
            for line, hyps, wanted in zip(lines, results, attention, strict=True)
        ]

    def costs(self, lines: Sequence[str]) -> list[int]:
        """Each line's source subwords as the translator counts them (truncated; at least 1)."""
        ids = self.translator.tokenizer.encode_src([line.strip() for line in lines])
        return [max(1, min(len(seq), self.translator.max_src_len)) for seq in ids]

    def round_tokens(self, settings: DecodingSettings) -> int:
        """A round's budget: ``round_batches`` batches of the translator (their source tokens shrink with
        the beam). The translator sorts a round's lines by length into its batches: with one batch's
        worth a round of mixed lengths made one full batch and a small one, which costs nearly as much."""
        batch = max(settings.batch_tokens // settings.beam, self.translator.max_src_len)
        return self.round_batches * batch
