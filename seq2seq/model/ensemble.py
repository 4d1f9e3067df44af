"""Several models decoding together: at each step, their token log-probabilities are averaged."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from seq2seq.errors import UserError
from seq2seq.model.decoder import DecoderState
from seq2seq.model.seq2seq import Seq2Seq


@dataclass
class EnsembleState:
    """One :class:`DecoderState` per model, reordered together."""

    states: list[DecoderState]

    def select(self, index: Tensor) -> EnsembleState:
        return EnsembleState([state.select(index) for state in self.states])


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

    def decode_step(self, tokens: Tensor, state: EnsembleState) -> tuple[Tensor, EnsembleState]:
        """tokens: (batch,) -> (batch, vocab) mean log-probabilities of the models, new state."""
        steps = [model.decode_step(tokens, s) for model, s in zip(self.models, state.states, strict=True)]
        log_probs = torch.stack([log_probs for log_probs, _ in steps]).mean(dim=0)
        return log_probs, EnsembleState([s for _, s in steps])
