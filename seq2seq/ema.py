"""An exponential moving average of the weights (``module.ema_decay``), as fairseq's ``--ema-decay`` and
Marian's ``--exponential-smoothing`` keep: late, noisy updates average out."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from seq2seq.errors import UserError


class WeightAverage(L.Callback):
    """Keeps an fp32 exponential moving average of the module's parameters, updated after every
    optimizer step: ``average = d * average + (1 - d) * weights``, the first update copying the weights,
    with ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so that the first weights, which
    are random, fade within a few dozen steps even with a decay close to 1 (TensorFlow's
    ``ExponentialMovingAverage(num_updates=...)``).

    What it changes in a run (the module calls :meth:`fill_checkpoint` from its ``on_save_checkpoint``):

    - validation runs with the averaged weights (swapped in, then back), so ``val_bleu`` and the choice
      of the best checkpoint are theirs;
    - weights-only checkpoints (the best ones, which the test split is scored with, and periodic ones)
      hold the averaged weights;
    - full checkpoints (``last.ckpt``) hold the raw weights, which keep training, and the average in
      this callback's state, so a resumed run continues both.

    Under DDP every process holds the same weights after each step (their gradients are all-reduced),
    so every process computes the same average; under ``bf16-mixed`` the average is fp32 like the
    weights, and it stays fp32 whatever the weights' type.
    """

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise UserError(f"module.ema_decay must be in (0, 1) or null, got {decay}")
        self.decay = decay
        self.updates = 0
        self.average: dict[str, Tensor] = {}  # parameter name -> fp32 average
        self._raw: dict[str, Tensor] | None = None  # the raw weights while the average is swapped in
        self._last_step = 0  # the trainer's optimizer steps at the last update

    def decay_after(self, updates: int) -> float:
        """The decay of the update that follows ``updates`` updates."""
        return min(self.decay, (1 + updates) / (10 + updates))

    def update(self, module: torch.nn.Module) -> None:
        """Fold the module's current parameters into the average."""
        names, params = zip(*module.named_parameters(), strict=True)
        weights = [p.detach().float() for p in params]
        if not self.average:
            self.average = {name: w.clone() for name, w in zip(names, weights, strict=True)}
        else:
            average = [self.average[name].to(w.device) for name, w in zip(names, weights, strict=True)]
            torch._foreach_lerp_(average, weights, 1.0 - self.decay_after(self.updates))
            self.average = dict(zip(names, average, strict=True))
        self.updates += 1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step > self._last_step:  # an optimizer step was taken (not mid-accumulation)
            self.update(pl_module)
            self._last_step = trainer.global_step

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.average and trainer.state.fn == "fit":
            self._raw = {name: p.detach().clone() for name, p in pl_module.named_parameters()}
            self._load(pl_module, self.average)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(pl_module)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore(pl_module)

    def _restore(self, pl_module: L.LightningModule) -> None:
        if self._raw is not None:
            self._load(pl_module, self._raw)
            self._raw = None

    @staticmethod
    def _load(module: torch.nn.Module, weights: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.copy_(weights[name])

    def fill_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Weights-only checkpoints get the averaged weights; full ones the raw weights (also while the
        average is swapped in), their average being in this callback's state."""
        weights_only = "optimizer_states" not in checkpoint
        source = self.average if weights_only else self._raw
        if not source:
            return
        state = checkpoint["state_dict"]
        for name, value in source.items():
            state[name] = value.to(device=state[name].device, dtype=state[name].dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "average": self.average}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates, self.average = state_dict["updates"], state_dict["average"]
