"""FLOP counts of the model's matrix products, for ThroughputMonitor's FLOP/s and MFU, and the benchmarks;
the peak FLOP/s of the host that MFU divides by.

Counted: the LSTMs (the gate matrix products, 2 x 4h x (input + h) per time step, direction and layer)
and the output projection (2 x hidden x vocabulary per projected row). Embeddings, element-wise gate
arithmetic, the bridge, attention and the softmax are left out: without attention, together they are a
few percent of the work.
"""

from __future__ import annotations

import functools
import time

import torch
from torch import nn

from seq2seq.data.collate import Batch
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


@functools.cache
def measured_peak_flops(device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of a square matrix product in ``dtype`` on ``device``, the fastest of repeats over about a fifth
    of a second: the peak that MFU divides by where no table knows the device (a CPU). The size doubles
    from 256 (up to 2048) until one product takes 20 ms, so that a slow (emulated) dtype costs no more.

    Measured, not computed from a clock and FLOPs per cycle, which differ between cores of one ISA (one
    or two full-width FMA units) and under a hypervisor. Measured once per process and argument set. The
    matrices come from a generator of their own: measuring during a run leaves its random stream alone.
    """
    generator = torch.Generator().manual_seed(0)

    def best_seconds(size: int, budget: float) -> float:
        """The fastest of at least 3 products of two size x size matrices, repeated for ``budget`` s."""
        a, b = (torch.randn(size, size, generator=generator).to(device, dtype) for _ in range(2))
        times: list[float] = []
        while len(times) < 3 or sum(times) < budget:
            started = time.perf_counter()
            torch.matmul(a, b)
            if device != "cpu":
                torch.accelerator.synchronize()
            times.append(time.perf_counter() - started)
        return min(times)

    size = 256
    while size < 2048 and best_seconds(size, 0) < 0.02:
        size *= 2
    return 2 * size**3 / best_seconds(size, 0.2)
