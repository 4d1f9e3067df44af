"""Callbacks (and a logger) that tests add to real training runs through the config
(``+callbacks.NAME._target_=...``, ``+logger.NAME._target_=...``).

``python train.py`` runs from the repository root, so ``tests.fault_callbacks`` is importable there.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.experimental.callback import Callback
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig


class RecordBatches(L.Callback):
    """Appends, per process, one JSON line per training batch: rank, step, epoch, pair indices and the
    learning rate it trains with."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        record = {
            "rank": trainer.global_rank,
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "indices": batch.indices.tolist(),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
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


class CtrlCAtStep(L.Callback):
    """Raises KeyboardInterrupt (what Ctrl-C raises wherever Python is) in the batch after ``step``
    optimizer steps: as it begins (``where="batch start"``: Lightning has counted the batch as ready but
    not trained it), or right after its optimizer step (``where="after step"``: trained, not yet counted
    as processed, its learning rate not yet stepped; no hook runs there, so the loop's optimization call
    is wrapped)."""

    def __init__(self, step: int, where: str = "batch start") -> None:
        self.step = step
        self.where = where

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.where != "after step":
            return
        optimization = trainer.fit_loop.epoch_loop.automatic_optimization
        run = optimization.run

        def run_then_interrupt(*args: Any, **kwargs: Any) -> Any:
            output = run(*args, **kwargs)
            if trainer.global_step == self.step + 1:
                raise KeyboardInterrupt
            return output

        optimization.run = run_then_interrupt

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.where == "batch start" and trainer.global_step == self.step:
            raise KeyboardInterrupt


class SlowToBuild(L.Callback):
    """Takes ``seconds`` to construct: a run that stays this long in its set-up, before training."""

    def __init__(self, seconds: float) -> None:
        time.sleep(seconds)


class BugAtBatch(L.Callback):
    """Fails the ``batch``-th training batch as a bug in our code or a library would: a ValueError from
    ``zip(strict=True)`` over sequences of different lengths (not a user's mistake: no UserError)."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.batch:
            list(zip(batch.indices.tolist(), [], strict=True))


# What reads a tensor's value into the host: on a GPU, each waits for the device's queue.
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
# The collectives a process can call from Python; DDP's gradient all-reduce is not among them (its
# reducer calls the process group from C++) and is counted by a communication hook instead.
COLLECTIVES = (
    "broadcast",
    "all_reduce",
    "all_gather",
    "all_gather_object",
    "broadcast_object_list",
    "barrier",
    "reduce",
    "gather",
    "scatter",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "gather_object",
)


class CountSynchronisations(L.Callback):
    """Counts, per training batch of this process, every host read of a tensor's value and every
    collective, with where it was called from (the first caller outside torch); writes them as JSON to
    ``{path}.rank{N}`` when training ends.

    Events are keyed by the optimizer step they belong to, as Lightning counts it for logging (its
    ``_batches_that_stepped`` + 1, so that ``step % log_every_n_steps == 0`` is a logging step), and
    counted only while the trainer is in its training stage (not validating).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.trainer: L.Trainer | None = None
        self.steps: dict[int, dict[str, int]] = {}
        self.epoch_ends: dict[str, int] = {}
        self.in_epoch_end = False
        self.depth = 0
        for name in HOST_READS:
            self._wrap(torch.Tensor, name, f"Tensor.{name}")
        for name in COLLECTIVES:
            self._wrap(torch.distributed, name, f"dist.{name}")

    def _wrap(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            if self.depth:  # inside a counted call: its own reads are part of it
                return original(*args, **kwargs)
            self.note(label)
            self.depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self.depth -= 1

        setattr(owner, name, counted)

    def note(self, label: str) -> None:
        trainer = self.trainer
        if trainer is None or trainer.state.stage != "train":
            return
        frame = sys._getframe(2)
        while frame.f_back is not None and f"{os.sep}torch{os.sep}" in frame.f_code.co_filename:
            frame = frame.f_back
        site = f"{label} from {Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"
        if self.in_epoch_end:
            counts = self.epoch_ends
        else:
            step = trainer.fit_loop.epoch_loop._batches_that_stepped + 1
            counts = self.steps.setdefault(step, {})
        counts[site] = counts.get(site, 0) + 1

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.trainer = trainer  # counting starts: what setting up the loop does once is left out
        model = trainer.strategy.model
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def counted_allreduce(state, bucket):  # DDP rejects annotations other than its own types
                self.note("DDP gradient all-reduce")
                self.depth += 1
                try:
                    return allreduce_hook(state, bucket)
                finally:
                    self.depth -= 1

            model.register_comm_hook(None, counted_allreduce)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.in_epoch_end = True

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.in_epoch_end = False

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.trainer = None
        record = {
            "log_every_n_steps": trainer.log_every_n_steps,
            "steps": self.steps,
            "epoch_ends": self.epoch_ends,
        }
        Path(f"{self.path}.rank{trainer.global_rank}").write_text(json.dumps(record), encoding="utf-8")


class InterruptJobStart(Callback):
    """A Hydra callback (``+hydra.callbacks.NAME._target_=...``): Ctrl-C in sweep job ``job`` as Hydra
    starts it, before the training task has run (so before the run could record anything itself)."""

    def __init__(self, job: int) -> None:
        self.job = job

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.job.num == self.job:
            raise KeyboardInterrupt


class RecordJobEnvironment(Callback):
    """A Hydra callback: appends a sweep job's number, process id and ``CUDA_VISIBLE_DEVICES`` (None where
    unset) as one JSON line to ``path`` as the job starts, then waits ``seconds``, so that every worker
    of a sweep takes a trial before any ends."""

    def __init__(self, path: str, seconds: float = 0.0) -> None:
        self.path = path
        self.seconds = seconds

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        record = {
            "job": config.hydra.job.num,
            "pid": os.getpid(),
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
        time.sleep(self.seconds)


class RaiseInTrainingStep(L.Callback):
    """Raises inside ``training_step`` of process ``rank`` at optimizer step ``step``, before the step's
    collectives: what a rank-local failure does, an out-of-memory error on one GPU by default, or
    ``KeyboardInterrupt`` (Ctrl-C reaching that process while the others train on)."""

    def __init__(self, step: int, rank: int, error: str = "OutOfMemoryError") -> None:
        self.step = step
        self.rank = rank
        self.error = error

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.global_rank != self.rank:
            return
        training_step = pl_module.training_step

        def failing_step(*args: Any, **kwargs: Any) -> Any:
            if trainer.global_step == self.step:
                if self.error == "KeyboardInterrupt":
                    raise KeyboardInterrupt
                raise torch.OutOfMemoryError(f"CUDA out of memory (raised by the test on rank {self.rank})")
            return training_step(*args, **kwargs)

        pl_module.training_step = failing_step


class SignalAfterStep(L.Callback):
    """Sends SIGUSR1 (SLURM's warning) to this process right after the optimizer step of the batch after
    ``step`` optimizer steps, where its handler then runs: the batch trained, not yet counted as
    processed, its learning rate not yet stepped (as ``CtrlCAtStep(where="after step")``)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        optimization = trainer.fit_loop.epoch_loop.automatic_optimization
        run = optimization.run

        def run_then_signal(*args: Any, **kwargs: Any) -> Any:
            output = run(*args, **kwargs)
            if trainer.global_step == self.step + 1:
                os.kill(os.getpid(), signal.SIGUSR1)
            return output

        optimization.run = run_then_signal


class SlowToSaveLogs(Logger):
    """A logger that logs nothing and, on the process of SLURM task ``rank``, takes ``seconds`` for a save
    that no logging came just before: not Lightning's after each logging step, but one asked for apart
    (as before a requeue signal's checkpoint), which that task then gets past this much later than the
    others."""

    def __init__(self, rank: int, seconds: float) -> None:
        super().__init__()
        self.slow = int(os.environ.get("SLURM_PROCID", 0)) == rank
        self.seconds = seconds
        self.logged = False  # metrics logged since the last save

    @property
    def name(self) -> str:
        return "slow_to_save"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged = True

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def save(self) -> None:
        if self.slow and not self.logged:
            time.sleep(self.seconds)
        self.logged = False
