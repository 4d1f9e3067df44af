"""The host's measured peak and a hook-based FLOP counter, shared by the benchmarks; the counts per LSTM step,
projection and training step are the package's (seq2seq/flops.py, also behind ThroughputMonitor's FLOP/s).
"""

from __future__ import annotations

import functools
import time

import torch
from torch import nn

from seq2seq.flops import lstm_flops_per_step, measured_peak_flops
from seq2seq.model import Seq2Seq


def peak_flops(precision: str, device: str | torch.device = "cpu") -> float:
    """Peak FLOP/s of ``device`` (this host's CPU by default) in the dtype of ``precision`` (a trainer
    precision such as ``bf16-mixed`` or a decoding one such as ``bf16``): measured with a matrix product
    (see seq2seq/flops.py), not computed from a clock and FLOPs per cycle, which gave 107 % "of peak" on
    an AVX-512 host. ``16-mixed``/``fp16``: float16; anything else not bf16: float32 (TF32 on a GPU where
    ``torch.set_float32_matmul_precision`` allows it)."""
    if precision.startswith("bf16"):
        dtype = torch.bfloat16
    elif precision.startswith(("16", "fp16")):
        dtype = torch.float16
    else:
        dtype = torch.float32
    if torch.device(device).type == "cuda":
        return gpu_peak_flops(str(device), dtype)
    return measured_peak_flops(str(device), dtype)


@functools.cache
def gpu_peak_flops(device: str, dtype: torch.dtype, size: int = 8192, repeats: int = 20) -> float:
    """FLOP/s of ``repeats`` back-to-back products of two size x size matrices on a GPU, the fastest of 5
    rounds (the first warms cuBLAS up). The package's CPU measurement (matrices up to 2048, one product
    between two synchronisations) would time a GPU's kernel launches and synchronisation rather than its
    arithmetic, and understate its peak several times over."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 * repeats / best


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
