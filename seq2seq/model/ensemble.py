"""Several models decoding together: at each step, their token log-probabilities are averaged."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from seq2seq.errors import UserError
from seq2seq.model.decoder import DecoderState, ShortlistOutput
from seq2seq.model.seq2seq import Seq2Seq


@dataclass
class EnsembleState:
    """One :class:`DecoderState` per model, reordered together."""

    states: list[DecoderState]

    def select(self, index: Tensor) -> EnsembleState:
        return EnsembleState([state.select(index) for state in self.states])


@dataclass
class EnsembleShortlist:
    """One :class:`ShortlistOutput` per model (the same ids, each model's own projection rows)."""

    outputs: list[ShortlistOutput]

    def select(self, sentences: Tensor) -> EnsembleShortlist:
        return EnsembleShortlist([output.select(sentences) for output in self.outputs])

    def token_ids(self, columns: Tensor) -> Tensor:
        return self.outputs[0].token_ids(columns)


class Ensemble(nn.Module):
    """The search interface of :class:`Seq2Seq` (``encode``, ``decode_step``) over several models of
    one vocabulary. Each model keeps its own encoder and decoder state; the next-token distribution
    is the mean of the models' log-probabilities."""

    def __init__(self, models: Sequence[Seq2Seq]) -> None:
        super().__init__()
        if not models:
            raise UserError("an ensemble needs at least one model")
        self.models = nn.ModuleList(models)

    def encode(self, src: Tensor, src_lengths: Tensor) -> EnsembleState:
        """src: (batch, src_len), src_lengths: (batch,) -> the initial state of every model."""
        return EnsembleState([model.encode(src, src_lengths) for model in self.models])

    def shortlist(self, ids: Tensor, allowed: Tensor) -> EnsembleShortlist:
        """Every model's output layer cut to ``ids`` (U,), sentence i's to ``allowed[i]`` (batch, U)."""
        return EnsembleShortlist([model.shortlist(ids, allowed) for model in self.models])

    def decode_step(
        self, tokens: Tensor, state: EnsembleState, output: EnsembleShortlist | None = None
    ) -> tuple[Tensor, EnsembleState]:
        """tokens: (batch,) -> (batch, vocab) mean log-probabilities of the models (with a shortlist
        ``output``: (batch, S) over its ids), new state."""
        outputs = [None] * len(self.models) if output is None else output.outputs
        steps = [
            model.decode_step(tokens, s, o)
            for model, s, o in zip(self.models, state.states, outputs, strict=True)
        ]
        log_probs = torch.stack([log_probs for log_probs, _ in steps]).mean(dim=0)
        return log_probs, EnsembleState([s for _, s in steps])
