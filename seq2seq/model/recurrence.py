"""Matrix products inside a Python loop over time steps, with the shared operand's gradient taken once.

Autograd differentiates a loop of ``x_t @ R`` step by step: each step's backward computes its own
gradient for the shared operand R (a weight, or the encoder's outputs that attention reads at every
step) and adds it to the running sum: T small products and T full-size additions. Here the steps keep
their inputs and, in the backward, their output gradients; R's gradient is then one product over all
steps, as cuDNN's LSTM does it for its weights. The input gradients stay per step, since the recurrence
needs them in order. R also enters the loop in the compute dtype once (under bf16 autocast a per-step
cast would copy it at every step).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class LoopOperand:
    """The right operand R of a product that every step of one loop takes: :meth:`product` per step.

    R is (in, out), shared by all rows (a weight, transposed), or (batch, in, out), one per sentence
    (attention's memory). Under ``torch.no_grad`` (search) the products are plain and nothing is kept.
    """

    def __init__(self, operand: Tensor) -> None:
        dtype = compute_dtype(operand)
        self.record = torch.is_grad_enabled() and operand.requires_grad
        self.inputs: list[Tensor] = []
        self.output_grads: dict[int, Tensor] = {}
        # both layouts contiguous, once: a batched product copies a transposed operand at every call
        cast = operand.to(dtype).contiguous()
        self.operand = _GatherOperandGrad.apply(cast, self) if self.record else cast
        self.transposed = cast.detach().transpose(-2, -1).contiguous() if self.record else None

    def product(self, x: Tensor) -> Tensor:
        """x: (batch, in) or, for a per-sentence R, (batch, rows, in) -> x @ R, in the compute dtype."""
        x = x.to(self.operand.dtype)
        if not self.record:
            return x @ self.operand
        return _StepProduct.apply(x, self.operand, self)


class _GatherOperandGrad(torch.autograd.Function):
    """Identity on R; its backward, which autograd runs after every step's (the steps consume its
    output), is R's gradient over all steps at once: (all steps' x)^T @ (all steps' output gradients)."""

    @staticmethod
    def forward(ctx: Any, operand: Tensor, loop: LoopOperand) -> Tensor:
        ctx.loop = loop
        return operand.view_as(operand)

    @staticmethod
    def backward(ctx: Any, unused: Tensor) -> tuple[Tensor, None]:
        loop = ctx.loop
        out_features = unused.size(-1)
        grads = []
        for step, x in enumerate(loop.inputs):
            # a step whose product reaches no loss term has no output gradient: zeros for its rows
            missing = step not in loop.output_grads
            grads.append(x.new_zeros(*x.shape[:-1], out_features) if missing else loop.output_grads.pop(step))
        inputs = torch.cat(loop.inputs, dim=-2)  # (T*B, in) or (batch, T*rows, in)
        loop.inputs.clear()
        return inputs.transpose(-2, -1) @ torch.cat(grads, dim=-2), None


class _StepProduct(torch.autograd.Function):
    """x @ R for one step: the input gradient now, R's left to :class:`_GatherOperandGrad`."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, operand: Tensor, loop: LoopOperand) -> Tensor:
        ctx.loop, ctx.step = loop, len(loop.inputs)
        loop.inputs.append(x.detach())
        return x @ operand

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        ctx.loop.output_grads[ctx.step] = grad
        return grad @ ctx.loop.transposed, None, None


def compute_dtype(tensor: Tensor) -> torch.dtype:
    """The dtype that products on ``tensor`` compute in: autocast's where it is on for the tensor's
    device, else the tensor's own."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


def layer_weights(rnn: nn.LSTM, layer: int) -> tuple[Tensor, Tensor]:
    """Layer ``layer`` of ``rnn`` as one product: [W_ih, W_hh] side by side, (4H, input_size + H), which
    multiplies [the layer's input; its previous output], and the two biases summed, (4H,)."""
    weights = [getattr(rnn, f"weight_ih_l{layer}"), getattr(rnn, f"weight_hh_l{layer}")]
    return torch.cat(weights, dim=1), getattr(rnn, f"bias_ih_l{layer}") + getattr(rnn, f"bias_hh_l{layer}")


def lstm_cell(gates: Tensor, cell: Tensor) -> tuple[Tensor, Tensor]:
    """One LSTM cell update: gates (B, 4H) before their activations, in PyTorch's order i, f, g, o, and
    the previous cell (B, H) -> the new hidden state and cell, (B, H) each."""
    in_gate, forget_gate, cell_input, out_gate = gates.chunk(4, dim=1)
    cell = forget_gate.sigmoid() * cell + in_gate.sigmoid() * cell_input.tanh()
    return out_gate.sigmoid() * cell.tanh(), cell


class InferenceStep:
    """``nn.LSTM`` over one position at inference (a search step), its cells written out.

    oneDNN's LSTM casts (under autocast) and lays out its weights again at every call, most of a bf16
    search step's time; here each layer's weights (:func:`layer_weights`) are prepared once per search,
    in the compute dtype (:meth:`prepare`, which the decoder calls as a search starts).
    """

    def __init__(self) -> None:
        self.dtype: torch.dtype | None = None
        self.layers: list[tuple[Tensor, Tensor]] = []

    def prepare(self, rnn: nn.LSTM, state: Tensor) -> None:
        """Take ``rnn``'s weights as they are now, in the dtype that steps on ``state`` compute in."""
        self.dtype = compute_dtype(state)
        self.layers = []
        for layer in range(rnn.num_layers):
            weight, bias = layer_weights(rnn, layer)
            self.layers.append((weight.t().to(self.dtype).contiguous(), bias.to(self.dtype)))

    def __call__(
        self, rnn: nn.LSTM, inputs: Tensor, hidden: Tensor, cell: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``rnn`` over inputs: (B, 1, input_size); hidden, cell: (layers, B, H) -> the output (B, 1, H) and
        the new hidden and cell states, as ``nn.LSTM`` in eval mode returns them."""
        dtype = compute_dtype(hidden)
        if dtype != self.dtype:  # not prepared for this search's precision
            self.prepare(rnn, hidden)
        layer_input, hiddens, cells = inputs.squeeze(1).to(dtype), [], []
        for (weight, bias), layer_hidden, layer_cell in zip(
            self.layers, hidden.to(dtype), cell.to(dtype), strict=True
        ):
            gates = torch.addmm(bias, torch.cat([layer_input, layer_hidden], dim=1), weight)
            layer_input, layer_cell = lstm_cell(gates, layer_cell)
            hiddens.append(layer_input)
            cells.append(layer_cell)
        return layer_input.unsqueeze(1), torch.stack(hiddens), torch.stack(cells)
