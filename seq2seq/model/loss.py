"""The training loss: label-smoothed cross-entropy over the vocabulary, fused.

Written out as one autograd function because the composed form keeps several (tokens x vocabulary)
tensors: under bf16 autocast ``F.cross_entropy`` copies the scores to fp32, keeps the log-softmax for its
backward, and the backward fills a zero tensor for the NLL's gather, adds the smoothing term and
converts back, each a full pass over the largest activation of the step. Here the forward keeps only
the scores as they came and one log-sum-exp per token, and both passes work through the tokens in
slices whose fp32 copy stays in the cache, in place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def smoothed_cross_entropy(scores: Tensor, targets: Tensor, smoothing: float) -> tuple[Tensor, Tensor]:
    """scores: (N, V) unnormalized, any float dtype; targets: (N,) ids.

    Returns the label-smoothed loss of each token, (1 - smoothing) * NLL + smoothing * the mean negative
    log-probability over the vocabulary (as ``F.cross_entropy(..., label_smoothing=smoothing)``), and
    each token's NLL (no gradient: perplexity), both (N,) in fp32.
    """
    return _SmoothedCrossEntropy.apply(scores, targets, smoothing)


# Tokens per slice: a (rows x vocabulary) fp32 slice stays in the core's cache between the passes over it.
ROWS = 128


class _SmoothedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, scores: Tensor, targets: Tensor, smoothing: float) -> tuple[Tensor, Tensor]:
        log_normalizer, nll, uniform = scores.new_empty(3, scores.size(0), dtype=torch.float32)
        for start in range(0, scores.size(0), ROWS):
            end = start + ROWS
            wide = scores[start:end].float()  # (rows, V)
            log_normalizer[start:end] = wide.logsumexp(dim=-1)
            nll[start:end] = log_normalizer[start:end] - wide.gather(1, targets[start:end, None]).squeeze(1)
            uniform[start:end] = log_normalizer[start:end] - wide.mean(dim=-1)  # mean negative log-prob
        ctx.save_for_backward(scores, targets, log_normalizer)
        ctx.smoothing = smoothing
        ctx.mark_non_differentiable(nll)
        return (1.0 - smoothing) * nll + smoothing * uniform, nll

    @staticmethod
    def backward(ctx: Any, grad_losses: Tensor, unused: Tensor) -> tuple[Tensor, None, None]:
        scores, targets, log_normalizer = ctx.saved_tensors
        smoothing, vocab = ctx.smoothing, scores.size(1)
        grad = torch.empty_like(scores)
        for start in range(0, scores.size(0), ROWS):
            end = start + ROWS
            # d loss_i / d score_ij = softmax_ij - smoothing / V - (1 - smoothing) [j == target_i]
            wide = scores[start:end].to(torch.float32, copy=True)
            wide.sub_(log_normalizer[start:end, None]).exp_().sub_(smoothing / vocab)
            wide.scatter_add_(1, targets[start:end, None], wide.new_full((wide.size(0), 1), smoothing - 1.0))
            grad[start:end] = wide.mul_(grad_losses[start:end, None])
        return grad, None, None
