"""The fused training loss (seq2seq.model.loss) against torch's cross-entropy with label smoothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seq2seq.model.loss import smoothed_cross_entropy


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_loss_and_its_gradient_match_torch_cross_entropy(smoothing, dtype):
    torch.manual_seed(0)
    scores = (3 * torch.randn(300, 50)).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (300,))  # more tokens than one slice (ROWS)
    weights = torch.rand(300)  # a gradient that differs per token, as a token-weighted sum gives
    kept = scores.detach().clone()

    losses, nll = smoothed_cross_entropy(scores, targets, smoothing)
    (grad,) = torch.autograd.grad((losses * weights).sum(), scores)
    wide = scores.detach().float().requires_grad_()
    reference = F.cross_entropy(wide, targets, label_smoothing=smoothing, reduction="none")
    (expected,) = torch.autograd.grad((reference * weights).sum(), wide)

    assert losses.dtype == nll.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(losses, reference)
    torch.testing.assert_close(nll, F.cross_entropy(wide.detach(), targets, reduction="none"))
    tolerance = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(grad.float(), expected, **tolerance)
    assert not nll.requires_grad
    assert torch.equal(scores.detach(), kept)  # the backward works on a copy of the saved scores
