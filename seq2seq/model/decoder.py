"""The LSTM decoder: teacher-forced over a whole sequence, or one step at a time for search."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from seq2seq.tokenization import PAD_ID


@dataclass
class DecoderState:
    """The decoder's recurrent state, one column per hypothesis.

    hidden, cell: (num_layers, batch, hidden_size).
    """

    hidden: Tensor
    cell: Tensor

    def select(self, index: Tensor) -> DecoderState:
        """Keep, repeat or reorder hypotheses: column i of the result is column ``index[i]`` of this state."""
        return DecoderState(self.hidden.index_select(1, index), self.cell.index_select(1, index))


class Decoder(nn.Module):
    """Embedding, LSTM and output projection.

    With ``tie_embeddings`` the projection shares its weight with the target embedding (Press & Wolf
    2017), which needs ``embed_size == hidden_size``.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_size: int,
        hidden_size: int,
        num_layers: int = 1,
        dropout: float = 0.0,
        tie_embeddings: bool = False,
    ) -> None:
        super().__init__()
        if tie_embeddings and embed_size != hidden_size:
            raise ValueError(
                "model.tie_embeddings needs model.embed_size == model.hidden_size,"
                f" got {embed_size} and {hidden_size}"
            )
        self.embedding = nn.Embedding(vocab_size, embed_size, padding_idx=PAD_ID)
        self.dropout = nn.Dropout(dropout)
        self.rnn = nn.LSTM(
            embed_size, hidden_size, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0
        )
        self.output = nn.Linear(hidden_size, vocab_size)
        if tie_embeddings:
            self.output.weight = self.embedding.weight

    def forward(self, tgt_in: Tensor, state: DecoderState) -> tuple[Tensor, DecoderState]:
        """Teacher forcing: one LSTM call over the whole target.

        tgt_in: (batch, tgt_len) ids starting with BOS. Returns the top-layer outputs
        (batch, tgt_len, hidden_size), before the projection (see :meth:`logits`), and the final state.
        """
        embedded = self.dropout(self.embedding(tgt_in))  # (B, T, E)
        outputs, (hidden, cell) = self.rnn(embedded, (state.hidden, state.cell))
        return self.dropout(outputs), DecoderState(hidden, cell)

    def logits(self, outputs: Tensor) -> Tensor:
        """(..., hidden_size) -> (..., vocab_size) unnormalized scores."""
        return self.output(outputs)

    def step(self, tokens: Tensor, state: DecoderState) -> tuple[Tensor, DecoderState]:
        """One step for search. tokens: (batch,) previous ids -> (batch, vocab_size) log-probs, new state."""
        outputs, state = self(tokens.unsqueeze(1), state)
        return self.logits(outputs.squeeze(1)).log_softmax(dim=-1), state
