"""The CPU's peak and a hook-based FLOP counter, shared by the benchmarks; the counts per LSTM step,
projection and training step are the package's (seq2seq/flops.py, also behind ThroughputMonitor's FLOP/s).
"""

from __future__ import annotations

import os

from torch import nn

from seq2seq.flops import lstm_flops_per_step
from seq2seq.model import Seq2Seq


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
