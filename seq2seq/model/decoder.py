"""The LSTM decoder: teacher-forced over a whole sequence, or one step at a time for search."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from seq2seq.errors import UserError
from seq2seq.model.attention import Attention
from seq2seq.model.encoder import EncoderOutput
from seq2seq.model.recurrence import InferenceStep, LoopOperand, layer_weights, lstm_cell
from seq2seq.tokenization import PAD_ID


@dataclass
class DecoderState:
    """The decoder's state, one row (or column) per hypothesis.

    hidden, cell: (num_layers, batch, hidden_size) LSTM states.
    With attention: memory (batch, src_len, memory_size) the encoder outputs, keys (batch, src_len,
    hidden_size) their projection for the attention scores, mask (batch, src_len) True at real source
    tokens, and feed (batch, hidden_size) the previous attentional vector (input feeding). None without.
    """

    hidden: Tensor
    cell: Tensor
    memory: Tensor | None = None
    keys: Tensor | None = None
    mask: Tensor | None = None
    feed: Tensor | None = None

    def select(self, index: Tensor) -> DecoderState:
        """Keep, repeat or reorder hypotheses: hypothesis i of the result is ``index[i]`` of this state."""

        def rows(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.index_select(0, index)

        return DecoderState(
            self.hidden.index_select(1, index), self.cell.index_select(1, index),
            rows(self.memory), rows(self.keys), rows(self.mask), rows(self.feed),
        )  # fmt: skip


@dataclass
class ShortlistOutput:
    """The output projection cut down to a batch's lexical shortlist: the union of its sentences' target
    ids, each sentence masked to its own, so that a sentence's scores do not depend on its batch.

    ids: (U,) the union, EOS first; weight: (U, hidden_size) and bias: (U,) their projection rows;
    mask: (batch, 1, U) 0 where the sentence may write the id, -inf elsewhere. The rows a step decodes
    are grouped by sentence: rows / batch consecutive ones each (the hypotheses of a beam). ``int8``:
    the rows packed for an int8 product, when the projection is int8 (dynamic quantization).
    """

    ids: Tensor
    weight: Tensor
    bias: Tensor
    mask: Tensor
    int8: Any = None

    def select(self, sentences: Tensor) -> ShortlistOutput:
        """Keep the shortlists of ``sentences`` (indices into the batch), in that order."""
        return ShortlistOutput(
            self.ids, self.weight, self.bias, self.mask.index_select(0, sentences), self.int8
        )

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden: (rows, H) decoder outputs, rows / batch consecutive ones per sentence -> (rows, U),
        in fp32 (search sums log-probabilities over many steps)."""
        if self.int8 is None:
            logits = torch.addmm(self.bias, hidden, self.weight.t())  # (rows, U)
        else:
            # as the int8 projection computes (activations quantized to 7 bits: fbgemm's reduce_range)
            logits = torch.ops.quantized.linear_dynamic(hidden, self.int8, reduce_range=True)
        # Cast, then add the fp32 mask in place: a bf16 + fp32 broadcast add takes a slow mixed-dtype path
        # (1.7 ms against 0.1 ms for 300 rows of 1,700 pieces in a probe; bf16 translate.py 4% faster).
        logits = logits.float()
        return logits.view(self.mask.size(0), -1, logits.size(-1)).add_(self.mask).view(logits.shape)

    def token_ids(self, columns: Tensor) -> Tensor:
        """Target ids of the columns (any shape) of :meth:`logits`."""
        return self.ids[columns]


class Decoder(nn.Module):
    """Embedding, LSTM, optional attention, and output projection.

    Without attention the LSTM's outputs are projected to the vocabulary. With attention, each LSTM
    output queries the encoder outputs, and the attentional vector tanh(W_c [h; context]) is projected
    instead (Luong et al. 2015); with ``input_feeding`` that vector also enters the next step's LSTM
    input, so teacher forcing then runs step by step. With ``tie_embeddings`` the projection shares its
    weight with the target embedding (Press & Wolf 2017), which needs ``embed_size == hidden_size``.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_size: int,
        hidden_size: int,
        num_layers: int = 1,
        dropout: float = 0.0,
        tie_embeddings: bool = False,
        attention: str | None = None,
        memory_size: int | None = None,
        input_feeding: bool = True,
    ) -> None:
        super().__init__()
        if tie_embeddings and embed_size != hidden_size:
            raise UserError(
                "model.tie_embeddings needs model.embed_size == model.hidden_size,"
                f" got {embed_size} and {hidden_size}"
            )
        self.input_feeding = attention is not None and input_feeding
        self.embedding = nn.Embedding(vocab_size, embed_size, padding_idx=PAD_ID)
        self.dropout = nn.Dropout(dropout)
        rnn_input = embed_size + (hidden_size if self.input_feeding else 0)
        self.rnn = nn.LSTM(
            rnn_input, hidden_size, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0
        )
        self.attention: Attention | None = None
        if attention is not None:
            memory_size = memory_size or hidden_size
            self.attention = Attention(attention, hidden_size, memory_size)
            self.combine = nn.Linear(hidden_size + memory_size, hidden_size, bias=False)
        self.output = nn.Linear(hidden_size, vocab_size)
        self._inference_step = InferenceStep()  # prepared as each search starts (init_state)
        if tie_embeddings:
            self.output.weight = self.embedding.weight

    def init_state(self, hidden: Tensor, cell: Tensor, encoded: EncoderOutput) -> DecoderState:
        """The state before the first target token: (hidden, cell) and, with attention, the memory."""
        if self._searching():  # a search starts: the weights its steps use
            self._inference_step.prepare(self.rnn, hidden)
        if self.attention is None:
            return DecoderState(hidden, cell)
        memory = encoded.outputs
        feed = memory.new_zeros(memory.size(0), hidden.size(-1)) if self.input_feeding else None
        return DecoderState(hidden, cell, memory, self.attention.keys(memory), encoded.mask, feed)

    def forward(self, tgt_in: Tensor, state: DecoderState) -> tuple[Tensor, DecoderState, Tensor | None]:
        """Teacher forcing over a whole target.

        tgt_in: (batch, tgt_len) ids starting with BOS. Returns the outputs (batch, tgt_len,
        hidden_size) before the projection (see :meth:`logits`), the final state, and with attention
        the weights (batch, tgt_len, src_len) over the source (else None).
        """
        embedded = self.dropout(self.embedding(tgt_in))  # (B, T, E)
        if self.input_feeding and tgt_in.size(1) > 1:
            return self._input_feeding(embedded, state)
        if self.input_feeding:  # one position (a search step): nothing to share over positions
            embedded = torch.cat([embedded, state.feed.unsqueeze(1)], dim=-1)
        if tgt_in.size(1) == 1 and self._searching():  # oneDNN would lay its weights out at each step
            outputs, hidden, cell = self._inference_step(self.rnn, embedded, state.hidden, state.cell)
        else:
            outputs, (hidden, cell) = self.rnn(embedded, (state.hidden, state.cell))
        state = replace(state, hidden=hidden, cell=cell)
        if self.attention is None:
            return self.dropout(outputs), state, None
        attentional, weights = self._attend(outputs, state)
        if self.input_feeding:
            state = replace(state, feed=attentional.squeeze(1))
        return self.dropout(attentional), state, weights

    def _searching(self) -> bool:
        """Inference with a float LSTM (not int8's): one position at a time runs as :class:`InferenceStep`."""
        return not (torch.is_grad_enabled() or self.training) and isinstance(self.rnn, nn.LSTM)

    def _input_feeding(self, embedded: Tensor, state: DecoderState) -> tuple[Tensor, DecoderState, Tensor]:
        """Teacher forcing with input feeding: the LSTM runs one position at a time, its cells written out
        so that the work that does not depend on the previous step is done once for the whole target:
        the embeddings' share of the first layer's gates, one (T*B)-row product per weight for the weight
        gradients (see :mod:`recurrence`), the weights cast to the compute dtype once. The parameters are
        ``self.rnn``'s (PyTorch's gate order i, f, g, o), so checkpoints and search see the same model.

        embedded: (B, T, E). Returns the outputs (B, T, H), the final state and the weights (B, T, S).
        """
        rnn, embed_size = self.rnn, self.embedding.embedding_dim
        # layer 0's input is [embedding; feed]: the embedding's product for all positions at once
        first, first_bias = layer_weights(rnn, 0)  # (4H, E + H + H)
        gates_in = torch.nn.functional.linear(embedded, first[:, :embed_size], first_bias)
        # per layer, the weight of [its input this step; its own previous output] and the summed biases
        recurrent = [LoopOperand(first[:, embed_size:].t())]
        biases: list[Tensor | None] = [None]
        for layer in range(1, rnn.num_layers):
            weight, bias = layer_weights(rnn, layer)
            recurrent.append(LoopOperand(weight.t()))
            biases.append(bias)
        combine = LoopOperand(self.combine.weight.t())
        attend = self.attention.loop(state.keys, state.memory, state.mask)
        hidden, cell = list(state.hidden.unbind(0)), list(state.cell.unbind(0))  # per layer (B, H)
        feed = state.feed
        steps, attention = [], []
        for step_gates in gates_in.unbind(1):  # (B, 4H): unbind, whose backward stacks once (not T slices)
            layer_input = feed
            for layer, (weight, bias) in enumerate(zip(recurrent, biases, strict=True)):
                gates = weight.product(torch.cat([layer_input, hidden[layer]], dim=1))
                gates = gates + (step_gates if bias is None else bias)
                hidden[layer], cell[layer] = lstm_cell(gates, cell[layer])
                layer_input = hidden[layer]
                if layer < rnn.num_layers - 1 and rnn.dropout and self.training:  # as nn.LSTM, between layers
                    layer_input = torch.nn.functional.dropout(layer_input, rnn.dropout, training=True)
            context, step_weights = attend.step(layer_input)  # (B, M), (B, S)
            feed = combine.product(torch.cat([layer_input, context], dim=1)).tanh()  # (B, H)
            steps.append(feed)
            attention.append(step_weights)
        state = replace(state, hidden=torch.stack(hidden), cell=torch.stack(cell), feed=feed)
        return self.dropout(torch.stack(steps, dim=1)), state, torch.stack(attention, dim=1)

    def _attend(self, outputs: Tensor, state: DecoderState) -> tuple[Tensor, Tensor]:
        """LSTM outputs (B, T, H) -> attentional vectors (B, T, H) and attention weights (B, T, S)."""
        contexts, weights = self.attention(outputs, state.keys, state.memory, state.mask)
        return torch.tanh(self.combine(torch.cat([outputs, contexts], dim=-1))), weights

    def logits(self, outputs: Tensor) -> Tensor:
        """(..., hidden_size) -> (..., vocab_size) unnormalized scores."""
        return self.output(outputs)

    def shortlist(self, ids: Tensor, allowed: Tensor) -> ShortlistOutput:
        """The projection cut to ``ids`` (U,), of which sentence i may write those ``allowed[i]`` (batch,
        U) says. Under autocast the rows are cast once here, not at every step."""
        weight, bias = self.output.weight, self.output.bias
        int8 = None
        if callable(weight):  # an int8 projection (dynamic quantization): its rows, packed as it packs
            weight, bias = weight()[ids], bias()[ids]
            int8 = torch.ops.quantized.linear_prepack(weight, bias)
        else:
            weight, bias = weight[ids], bias[ids]  # (U, H), (U,)
        device = ids.device.type
        if torch.is_autocast_enabled(device):
            weight, bias = (t.to(torch.get_autocast_dtype(device)) for t in (weight, bias))
        mask = torch.zeros(allowed.shape, device=ids.device).masked_fill(~allowed, float("-inf"))
        return ShortlistOutput(ids, weight, bias, mask.unsqueeze(1), int8)

    def step(
        self, tokens: Tensor, state: DecoderState, output: ShortlistOutput | None = None
    ) -> tuple[Tensor, DecoderState]:
        """One step for search. tokens: (batch,) previous ids -> log-probs and the new state: (batch,
        vocab_size) over the vocabulary, or with a shortlist ``output`` (batch, U) over its ids, each
        sentence's normalized over its own (as Marian does)."""
        outputs, state, _ = self(tokens.unsqueeze(1), state)
        hidden = outputs.squeeze(1)  # (rows, H)
        logits = self.logits(hidden) if output is None else output.logits(hidden)
        # fp32 log-probs under bf16 autocast too: search sums them over many steps.
        return logits.float().log_softmax(dim=-1), state
