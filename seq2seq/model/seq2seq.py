"""The encoder-decoder: the encoder's final (h, c) is the context vector that starts the decoder."""

from __future__ import annotations

from torch import Tensor, nn

from seq2seq.errors import UserError, is_int, is_number
from seq2seq.model.decoder import Decoder, DecoderState, ShortlistOutput
from seq2seq.model.encoder import Bridge, Encoder


class Seq2Seq(nn.Module):
    """An LSTM encoder-decoder (Sutskever et al. 2014) with optional improvements as options.

    Args:
        src_vocab_size, tgt_vocab_size: vocabulary sizes (from the tokenizer).
        embed_size: embedding size of both sides.
        hidden_size: LSTM size of the decoder, and of the encoder's output (both directions together).
        num_layers: LSTM layers of encoder and decoder (the decoder takes one state per layer).
        dropout: on embeddings, between LSTM layers and before the output projection.
        bidirectional: a bidirectional encoder (each direction ``hidden_size // 2`` units).
        bridge: a learned layer between the encoder's final states and the decoder's initial states.
        reverse_source: read the source backwards.
        tie_embeddings: share the target embedding with the output projection.
        attention: None (the context vector alone), or ``bahdanau``, ``luong_general``, ``luong_dot``:
            the decoder attends over the encoder outputs (see :class:`Decoder`).
        input_feeding: with attention, feed each step's attentional vector into the next step.
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        embed_size: int = 256,
        hidden_size: int = 512,
        num_layers: int = 1,
        dropout: float = 0.1,
        bidirectional: bool = False,
        bridge: bool = False,
        reverse_source: bool = False,
        tie_embeddings: bool = False,
        attention: str | None = None,
        input_feeding: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (
            ("embed_size", embed_size),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
        ):
            if not is_int(value) or value < 1:
                raise UserError(f"model.{name} must be positive, got {value!r}")
        if not is_number(dropout) or not 0.0 <= dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {dropout!r}")
        self.encoder = Encoder(
            src_vocab_size, embed_size, hidden_size, num_layers, dropout, bidirectional, reverse_source
        )
        self.bridge = Bridge(hidden_size, hidden_size) if bridge else None
        self.decoder = Decoder(
            tgt_vocab_size, embed_size, hidden_size, num_layers, dropout, tie_embeddings,
            attention=attention, memory_size=hidden_size, input_feeding=input_feeding,
        )  # fmt: skip

    def encode(self, src: Tensor, src_lengths: Tensor) -> DecoderState:
        """src: (batch, src_len), src_lengths: (batch,) -> initial decoder state (context vector, and the
        encoder outputs for attention)."""
        encoded = self.encoder(src, src_lengths)
        hidden, cell = encoded.hidden, encoded.cell
        if self.bridge is not None:
            hidden, cell = self.bridge(hidden, cell)
        return self.decoder.init_state(hidden, cell, encoded)

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced pass -> (batch, tgt_len, hidden_size) decoder outputs; see :meth:`logits`.

        The projection is left to the caller so that a loss can project only the non-pad positions.
        """
        return self.forward_with_attention(src, src_lengths, tgt_in)[0]

    def forward_with_attention(
        self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """:meth:`forward`, and the attention weights (batch, tgt_len, src_len), None without attention."""
        outputs, _, weights = self.decoder(tgt_in, self.encode(src, src_lengths))
        return outputs, weights

    def logits(self, outputs: Tensor) -> Tensor:
        """(..., hidden_size) decoder outputs -> (..., tgt_vocab_size) scores."""
        return self.decoder.logits(outputs)

    def shortlist(self, ids: Tensor, allowed: Tensor) -> ShortlistOutput:
        """The output layer cut to ``ids`` (U,), sentence i's to those ``allowed[i]`` (batch, U) says."""
        return self.decoder.shortlist(ids, allowed)

    def decode_step(
        self, tokens: Tensor, state: DecoderState, output: ShortlistOutput | None = None
    ) -> tuple[Tensor, DecoderState]:
        """tokens: (batch,) -> (batch, tgt_vocab_size) log-probabilities of the next token (with a
        shortlist ``output``: (batch, U) over its ids), new state."""
        return self.decoder.step(tokens, state, output)
