"""Callbacks that tests add to real training runs through the config (``+callbacks.NAME._target_=...``).

``python train.py`` runs from the repository root, so ``tests.fault_callbacks`` is importable there.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer


class RecordBatches(L.Callback):
    """Appends, per process, one JSON line per training batch: rank, step, epoch and pair indices."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        record = {
            "rank": trainer.global_rank,
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "indices": batch.indices.tolist(),
        }
        with open(f"{self.path}.rank{trainer.global_rank}", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class RecordWeights(L.Callback):
    """Appends, per process, one JSON line per training batch: step and a digest of the weights and of
    the optimizer state before and after it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._before = ""

    @staticmethod
    def digest(trainer: L.Trainer, pl_module: Any) -> str:
        tensors = [p.detach() for p in pl_module.parameters()]
        tensors += [v for s in trainer.optimizers[0].state.values() for v in s.values() if torch.is_tensor(v)]
        return hashlib.sha1(b"".join(t.cpu().numpy().tobytes() for t in tensors)).hexdigest()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._before = self.digest(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        record = {
            "step": trainer.global_step,
            "before": self._before,
            "after": self.digest(trainer, pl_module),
        }
        with open(f"{self.path}.rank{trainer.global_rank}", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_records(path: str | Path, rank: int = 0) -> list[dict[str, Any]]:
    lines = Path(f"{path}.rank{rank}").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


class NanAtBatch(L.Callback):
    """Makes the decoder output NaN for the ``batch``-th training batch only (of process ``rank`` only, if
    given): a non-finite loss."""

    def __init__(self, batch: int, rank: int | None = None) -> None:
        self.batch = batch
        self.rank = rank
        self._hook: Any = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.batch and self.rank in (None, trainer.global_rank):
            # The decoder returns (outputs, state): poison the outputs, keeping them in the graph (under DDP
            # every parameter must still get a gradient).
            self._hook = pl_module.model.decoder.register_forward_hook(
                lambda module, args, output: (output[0] * float("nan"), *output[1:])
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


class RecordLearningRates(L.Callback):
    """Appends one JSON line when training starts and one per training batch, after the scheduler has
    stepped: the step, the rate of the next step, and the share of the time budget used (None without
    ``trainer.max_time``)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.on_train_batch_end(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        used = None
        if timer is not None and timer.time_remaining() is not None:
            used = timer.time_elapsed() / (timer.time_elapsed() + timer.time_remaining())
        with open(f"{self.path}.rank{trainer.global_rank}", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": trainer.global_step, "lr": lr, "used": used}) + "\n")


class StopAtStep(L.Callback):
    """Ends training (as a limit would) once ``step`` optimizer steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True
