"""FLOP counts of the model's matrix products: for ThroughputMonitor's FLOP/s and MFU, and the benchmarks.

Counted: the LSTMs (the gate matrix products, 2 x 4h x (input + h) per time step, direction and layer)
and the output projection (2 x hidden x vocabulary per projected row). Embeddings, element-wise gate
arithmetic, the bridge, attention and the softmax are left out: without attention, together they are a
few percent of the work.
"""

from __future__ import annotations

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
