"""Attention of decoder states over the encoder's outputs: Bahdanau (additive) and Luong (general, dot)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from seq2seq.errors import UserError
from seq2seq.model.recurrence import LoopOperand

ATTENTION_KINDS = ("bahdanau", "luong_general", "luong_dot")


class Attention(nn.Module):
    """Scores each decoder query against every source position and averages the memory by the weights.

    Scores (q: decoder state, k: encoder output at one source position):
    ``bahdanau`` v^T tanh(W_q q + W_k k) (Bahdanau et al. 2015); ``luong_general`` q^T W k and
    ``luong_dot`` q^T k (Luong et al. 2015; dot needs equal sizes). Padding positions get zero weight.
    The memory's share of the work (W_k k, or W k) is computed once per sentence by :meth:`keys`.
    """

    def __init__(self, kind: str, query_size: int, memory_size: int) -> None:
        super().__init__()
        if kind not in ATTENTION_KINDS:
            raise UserError(f"model.attention must be null or one of {ATTENTION_KINDS}, got {kind!r}")
        if kind == "luong_dot" and query_size != memory_size:
            raise UserError(f"luong_dot attention needs equal sizes, got {query_size} and {memory_size}")
        self.kind = kind
        if kind == "bahdanau":
            self.query_layer = nn.Linear(query_size, query_size, bias=False)
            self.key_layer = nn.Linear(memory_size, query_size, bias=False)
            self.energy = nn.Linear(query_size, 1, bias=False)
        elif kind == "luong_general":
            self.key_layer = nn.Linear(memory_size, query_size, bias=False)

    def keys(self, memory: Tensor) -> Tensor:
        """memory: (batch, src_len, memory_size) -> keys (batch, src_len, query_size)."""
        return memory if self.kind == "luong_dot" else self.key_layer(memory)

    def forward(self, queries: Tensor, keys: Tensor, memory: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """queries: (batch, tgt_len, query_size); keys: from :meth:`keys`; memory: (batch, src_len,
        memory_size); mask: (batch, src_len), True at real tokens.

        Returns the contexts (batch, tgt_len, memory_size) and the weights (batch, tgt_len, src_len),
        which sum to 1 over the real source positions.
        """
        if self.kind == "bahdanau":
            scores = self.additive_scores(self.query_layer(queries), keys)
        else:
            scores = queries @ keys.transpose(1, 2)  # (B, T, S)
        weights = masked_softmax(scores, mask)
        return weights @ memory, weights

    def additive_scores(self, projected: Tensor, keys: Tensor) -> Tensor:
        """Bahdanau's v^T tanh(W_q q + W_k k): projected queries (B, T, A), keys (B, S, A) -> (B, T, S)."""
        return self.energy(torch.tanh(projected.unsqueeze(2) + keys.unsqueeze(1))).squeeze(-1)

    def loop(self, keys: Tensor, memory: Tensor, mask: Tensor) -> AttentionLoop:
        """This attention for a decoder that queries one position at a time (input feeding); arguments
        as :meth:`forward`'s."""
        return AttentionLoop(self, keys, memory, mask)


class AttentionLoop:
    """:class:`Attention` over one sequence, one query per step: the same scores and weights, with the
    operands every step reads (the memory; the keys or the query projection) as :class:`LoopOperand`,
    so that their gradients are one product over all steps rather than a sum of T."""

    def __init__(self, attention: Attention, keys: Tensor, memory: Tensor, mask: Tensor) -> None:
        self.attention = attention
        self.memory = LoopOperand(memory)  # (B, S, M)
        self.mask = mask  # (B, S)
        if attention.kind == "bahdanau":
            self.query, self.keys = LoopOperand(attention.query_layer.weight.t()), keys  # (Q, A), (B, S, A)
        else:
            self.query, self.keys = None, LoopOperand(keys.transpose(1, 2))  # (B, Q, S)

    def step(self, query: Tensor) -> tuple[Tensor, Tensor]:
        """query: (B, Q) -> the context (B, M) and the weights (B, S)."""
        if self.query is not None:
            scores = self.attention.additive_scores(self.query.product(query).unsqueeze(1), self.keys)
        else:
            scores = self.keys.product(query.unsqueeze(1))  # (B, 1, Q) @ (B, Q, S)
        weights = masked_softmax(scores, self.mask)  # (B, 1, S)
        return self.memory.product(weights).squeeze(1), weights.squeeze(1)


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """scores: (B, T, S), mask: (B, S) True at real source tokens -> weights summing to 1 over those."""
    return scores.masked_fill(~mask.unsqueeze(1), float("-inf")).softmax(dim=-1)
