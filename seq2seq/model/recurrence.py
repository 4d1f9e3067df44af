"""Matrix products inside a Python loop over time steps, with the weight gradient taken once per sequence.

Autograd differentiates a loop of ``x_t @ W.T`` step by step: each step's backward computes its own
(out x in) weight gradient and adds it to the running sum, T small products and T full-size additions
per weight. Here the steps keep their inputs and, in the backward, their output gradients; the weight
gradient is then one product over all steps, (out, T*B) @ (T*B, in), as cuDNN's LSTM does it. The
input gradients stay per step, since the recurrence needs them in order. A weight also enters the loop
in the compute dtype once (under bf16 autocast a per-step cast would copy it at every step).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class LoopWeight:
    """One weight (out_features, in_features) as the steps of one loop use it: :meth:`product` per step.

    Under ``torch.no_grad`` (search) the products are plain matrix products and nothing is kept.
    """

    def __init__(self, weight: Tensor) -> None:
        autocast = torch.is_autocast_enabled(weight.device.type)
        dtype = torch.get_autocast_dtype(weight.device.type) if autocast else weight.dtype
        self.record = torch.is_grad_enabled() and weight.requires_grad
        self.inputs: list[Tensor] = []
        self.output_grads: dict[int, Tensor] = {}
        cast = weight.to(dtype)
        self.weight = _GatherWeightGrad.apply(cast, self) if self.record else cast

    def product(self, x: Tensor) -> Tensor:
        """x: (batch, in_features) -> x @ weight.T (batch, out_features), in the loop's compute dtype."""
        x = x.to(self.weight.dtype)
        if not self.record:
            return x.mm(self.weight.t())
        return _StepProduct.apply(x, self.weight, self)


class _GatherWeightGrad(torch.autograd.Function):
    """Identity on the weight; its backward, which autograd runs after every step's (the steps consume
    its output), is the weight gradient over all steps at once."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, loop: LoopWeight) -> Tensor:
        ctx.loop = loop
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx: Any, unused: Tensor) -> tuple[Tensor, None]:
        loop = ctx.loop
        inputs = torch.cat(loop.inputs)  # (T*B, in)
        # a step whose product reaches no loss term has no output gradient: zeros for its rows
        out_features = unused.size(0)
        grads = torch.cat(
            [
                loop.output_grads.pop(t) if t in loop.output_grads else x.new_zeros(x.size(0), out_features)
                for t, x in enumerate(loop.inputs)
            ]
        )  # (T*B, out)
        loop.inputs.clear()
        return grads.t().mm(inputs), None


class _StepProduct(torch.autograd.Function):
    """x @ W.T for one step: the input gradient now, the weight's left to :class:`_GatherWeightGrad`."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, loop: LoopWeight) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.loop, ctx.step = loop, len(loop.inputs)
        loop.inputs.append(x.detach())
        return x.mm(weight.t())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        ctx.loop.output_grads[ctx.step] = grad
        return grad.mm(weight), None, None
