"""FLOP counts of the model's matrix products, and the CPU's peak, shared by the benchmarks.

Counted: the LSTMs (the gate matrix products, 2 x 4h x (input + h) per time step, direction and layer)
and the output projection (2 x hidden x vocabulary per projected row). Embeddings, element-wise gate
arithmetic, the bridge and the softmax are left out: together they are a few percent of the work.
"""

from __future__ import annotations

import os

from torch import nn

from seq2seq.data.batching import Batch
from seq2seq.model import Seq2Seq


def lstm_flops_per_step(lstm: nn.LSTM) -> int:
    """Multiply-add FLOPs of one time step of one sequence through all layers and directions."""
    directions = 2 if lstm.bidirectional else 1
    h = lstm.hidden_size
    total = 0
    for layer in range(lstm.num_layers):
        inputs = lstm.input_size if layer == 0 else h * directions
        total += directions * 2 * 4 * h * (inputs + h)
    return total


def projection_flops(model: Seq2Seq) -> int:
    """FLOPs of projecting one decoder output onto the target vocabulary."""
    return 2 * model.decoder.output.in_features * model.decoder.output.out_features


def training_flops(model: Seq2Seq, batch: Batch) -> int:
    """FLOPs of a training step on ``batch``: forward as executed (padded time steps included, the
    projection on real target tokens only, as the module computes it), and backward at twice that."""
    forward = (
        batch.src.numel() * lstm_flops_per_step(model.encoder.rnn)
        + batch.tgt_in.numel() * lstm_flops_per_step(model.decoder.rnn)
        + batch.num_target_tokens * projection_flops(model)
    )
    return 3 * forward


def peak_flops(ghz: float, flops_per_cycle: int) -> tuple[float, str]:
    """Peak FLOP/s of the cores this process may use, and how it was computed."""
    cores = len(os.sched_getaffinity(0))
    peak = cores * ghz * 1e9 * flops_per_cycle
    return peak, f"{cores} cores x {ghz} GHz x {flops_per_cycle} FLOP/cycle = {peak / 1e9:.0f} GFLOP/s"


class FlopCounter:
    """Counts the FLOPs of a model's LSTM and projection calls while enabled, with forward hooks."""

    def __init__(self, model: Seq2Seq) -> None:
        self.flops = 0
        self._hooks = [
            model.encoder.rnn.register_forward_hook(self._lstm_hook),
            model.decoder.rnn.register_forward_hook(self._lstm_hook),
            model.decoder.output.register_forward_hook(self._projection_hook),
        ]

    def _lstm_hook(self, lstm: nn.LSTM, args: tuple, output: object) -> None:
        inputs = args[0]
        steps = inputs.data.size(0) if hasattr(inputs, "batch_sizes") else inputs.size(0) * inputs.size(1)
        self.flops += steps * lstm_flops_per_step(lstm)

    def _projection_hook(self, linear: nn.Linear, args: tuple, output: object) -> None:
        self.flops += 2 * args[0].numel() * linear.out_features

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
