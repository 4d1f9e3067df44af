"""The LSTM encoder and the bridge from its final states to the decoder's initial state."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from seq2seq.errors import UserError
from seq2seq.tokenization import PAD_ID


@dataclass
class EncoderOutput:
    """What the encoder hands on.

    outputs: (batch, src_len, hidden_size) top-layer states, both directions concatenated; zero at padding.
    hidden, cell: (num_layers, batch, hidden_size) final states, both directions concatenated.
    mask: (batch, src_len) True at real tokens.
    """

    outputs: Tensor
    hidden: Tensor
    cell: Tensor
    mask: Tensor


def reverse_padded(tokens: Tensor, lengths: Tensor) -> Tensor:
    """Reverse each row's first ``lengths[b]`` tokens in place of the padding-free prefix.

    tokens: (batch, seq_len); lengths: (batch,). Padding stays at the end.
    """
    positions = torch.arange(tokens.size(1), device=tokens.device).expand_as(tokens)
    lengths = lengths.to(tokens.device, non_blocking=True).unsqueeze(1)
    source_index = torch.where(positions < lengths, lengths - 1 - positions, positions)
    return tokens.gather(1, source_index)


class Encoder(nn.Module):
    """Embedding and a (multi-layer, optionally bidirectional) LSTM over packed sequences.

    Packing keeps padding out of the recurrence, so a sentence's states do not depend on how much
    padding its batch needed. When bidirectional, each direction has ``hidden_size // 2`` units and
    their states are concatenated, so the output size is ``hidden_size`` either way. With
    ``reverse_source`` the tokens are read last to first (Sutskever et al. 2014).
    """

    def __init__(
        self,
        vocab_size: int,
        embed_size: int,
        hidden_size: int,
        num_layers: int = 1,
        dropout: float = 0.0,
        bidirectional: bool = False,
        reverse_source: bool = False,
    ) -> None:
        super().__init__()
        if bidirectional and hidden_size % 2:
            raise UserError(f"model.hidden_size must be even with model.bidirectional, got {hidden_size}")
        self.num_directions = 2 if bidirectional else 1
        self.reverse_source = reverse_source
        self.embedding = nn.Embedding(vocab_size, embed_size, padding_idx=PAD_ID)
        self.dropout = nn.Dropout(dropout)
        self.rnn = nn.LSTM(
            embed_size,
            hidden_size // self.num_directions,
            num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
            bidirectional=bidirectional,
        )

    def forward(self, src: Tensor, src_lengths: Tensor) -> EncoderOutput:
        """src: (batch, src_len) ids; src_lengths: (batch,) true lengths, all >= 1, best on the CPU."""
        if self.reverse_source:
            src = reverse_padded(src, src_lengths)
        embedded = self.dropout(self.embedding(src))  # (B, S, E)
        lengths = src_lengths.cpu()
        if bool((lengths == src.size(1)).all()):
            # No padding: the same result, and on CPU twice as fast as packing (oneDNN has no packed path).
            outputs, (hidden, cell) = self.rnn(embedded)  # hidden, cell: (L * dirs, B, H / dirs)
        else:
            # Sorted here, on the CPU: with enforce_sorted=False torch would copy the order to the device
            # and back, and the copy back waits for the device.
            lengths, order = lengths.sort(descending=True)
            restore = order.argsort().to(src.device, non_blocking=True)
            order = order.to(src.device, non_blocking=True)
            packed = pack_padded_sequence(embedded.index_select(0, order), lengths, batch_first=True)
            packed_out, (hidden, cell) = self.rnn(packed)
            outputs, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=src.size(1))
            outputs, hidden, cell = outputs[restore], hidden[:, restore], cell[:, restore]
        return EncoderOutput(
            outputs=self.dropout(outputs),
            hidden=self._merge_directions(hidden),
            cell=self._merge_directions(cell),
            mask=src != PAD_ID,
        )

    def _merge_directions(self, state: Tensor) -> Tensor:
        """(L * dirs, B, H / dirs) -> (L, B, H): each layer's forward and backward states side by side."""
        if self.num_directions == 1:
            return state
        layers2, batch, size = state.shape
        return state.view(layers2 // 2, 2, batch, size).transpose(1, 2).reshape(layers2 // 2, batch, 2 * size)


class Bridge(nn.Module):
    """A learned map from the encoder's final (h, c) to the decoder's initial (h, c).

    h0 = tanh(W_h h_enc + b_h) and c0 = W_c c_enc + b_c, applied to every layer.
    """

    def __init__(self, encoder_size: int, decoder_size: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(encoder_size, decoder_size)
        self.cell = nn.Linear(encoder_size, decoder_size)

    def forward(self, hidden: Tensor, cell: Tensor) -> tuple[Tensor, Tensor]:
        """hidden, cell: (layers, batch, encoder_size) -> two (layers, batch, decoder_size) tensors."""
        return torch.tanh(self.hidden(hidden)), self.cell(cell)
