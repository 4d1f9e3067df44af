"""Training speed: the Lightning Trainer against a plain PyTorch loop, same model, batches and optimizer.

    python bench/train_throughput.py [--models small base] [--steps 20] [--precisions 32-true bf16-mixed]
        [--device cpu|cuda|cuda:N]

For each model and precision, the first ``--warmup + --steps`` training batches of the Bible split's
first epoch are run through (1) this project's TranslationModule driven by ``lightning.Trainer`` and
(2) a plain loop calling the same module's loss, ``backward``, gradient clipping, AdamW and the
learning-rate schedule, in ``--rounds`` alternating rounds; each step's fastest time over the rounds
is kept (load from other processes only slows steps down, so this is the closest to an idle machine).
Prints target tokens/s of the timed steps of each and their ratio, the padding efficiency of a whole
epoch's batches, and the achieved GFLOP/s against the device's peak, a matrix product measured there in
the precision's dtype (see flops.py). ``--device`` (default: cuda where there is one, else cpu) is where
both train; on a GPU each step's time ends when the GPU has finished it.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import time
from pathlib import Path

import lightning as L
import torch
from flops import peak_flops
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from step_side_by_side import new_module
from torch.utils.data import DataLoader

from seq2seq.data.collate import Batch
from seq2seq.data.datamodule import TranslationDataModule
from seq2seq.data.sampler import padding_efficiency
from seq2seq.flops import training_flops

REPO = Path(__file__).resolve().parents[1]


def now(device: torch.device) -> float:
    """The time once ``device`` has done the work queued so far (a GPU runs behind the host)."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)
    return time.perf_counter()


class StepTimer(L.Callback):
    """Wall time of each batch from ``warmup`` on: from its start to the next one's (the last: to its end)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.marks: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_step >= self.warmup:
            self.marks.append(now(pl_module.device))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        self.end = now(pl_module.device)

    def step_seconds(self) -> list[float]:
        marks = [*self.marks, self.end]
        return [b - a for a, b in itertools.pairwise(marks)]


PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")  # Lightning's names


def build(model_name: str, overrides: list[str]) -> tuple[TranslationDataModule, dict, float]:
    cache = os.environ.get("SEQ2SEQ_CACHE_DIR", str(REPO / ".cache"))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"model={model_name}",
                "paths.output_dir=/tmp/bench",
                f"paths.cache_dir={cache}",
                *overrides,
            ],
        )
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    return datamodule, cfg, float(cfg.trainer.gradient_clip_val)


def accelerator(device: torch.device) -> tuple[str, list[int] | int]:
    """Lightning's accelerator and devices for ``device`` (cuda:N: that GPU alone)."""
    if device.type == "cpu":
        return "cpu", 1
    return device.type, [device.index or 0]


def run_lightning(
    cfg, datamodule, batches: list[Batch], warmup: int, precision: str, clip: float, device: torch.device
) -> list[float]:
    timer = StepTimer(warmup)
    kind, devices = accelerator(device)
    trainer = L.Trainer(
        accelerator=kind, devices=devices, precision=precision, max_steps=len(batches),
        gradient_clip_val=clip, callbacks=[timer], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(new_module(cfg, datamodule), train_dataloaders=DataLoader(batches, batch_size=None))
    return timer.step_seconds()


def run_plain(
    cfg, datamodule, batches: list[Batch], warmup: int, precision: str, clip: float, device: torch.device
) -> list[float]:
    module = new_module(cfg, datamodule).to(device)
    if precision in ("bf16-true", "16-true"):  # as Lightning's: weights and activations in that dtype
        module.to(torch.bfloat16 if precision == "bf16-true" else torch.float16)
    module.train()
    optimizers = module.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    mixed = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=mixed) if mixed else contextlib.nullcontext()
    # 16-mixed scales the loss, as Lightning's MixedPrecision does (fp16 gradients underflow otherwise)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
    marks = []
    for step, batch in enumerate(batches):
        if step >= warmup:
            marks.append(now(device))
        batch = module.transfer_batch_to_device(batch, device, 0)
        with autocast:
            losses, _ = module.smoothed_losses(batch)
        scaler.scale(losses.mean()).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    marks.append(now(device))
    return [b - a for a, b in itertools.pairwise(marks)]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["small", "base"])
    # Named choices, so that Hydra overrides written after --precisions fail loudly instead of being
    # taken as precisions (which measured the unchanged model).
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=["32-true", "bf16-mixed"],
        choices=PRECISIONS,
        help="also: bf16-true",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternating rounds; per step, the fastest is kept"
    )
    parser.add_argument(
        "--device", default=default_device(), help="cpu, cuda or cuda:N (default: cuda where there is one)"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.batch_tokens=6000")
    args = parser.parse_args()
    device = torch.device(args.device)
    peaks = {precision: peak_flops(precision, device) for precision in args.precisions}
    measured = ", ".join(f"{precision} {peak / 1e9:.0f}" for precision, peak in peaks.items())
    print(
        f"peak GFLOP/s on {args.device} (measured matrix product): {measured}; torch {torch.__version__},"
        f" {torch.get_num_threads()} threads"
    )

    for model_name in args.models:
        datamodule, cfg, clip = build(model_name, args.overrides)
        split = datamodule.splits["train"]
        epoch = datamodule._batch_sampler(split, "train").batches(epoch=0)
        src_efficiency, tgt_efficiency = padding_efficiency(split.src_lengths(), split.tgt_lengths(), epoch)
        batches = [split.collate(indices) for indices in epoch[: args.warmup + args.steps]]
        timed = batches[args.warmup :]
        tokens = sum(b.num_target_tokens for b in timed)
        model = new_module(cfg, datamodule).model
        flops = sum(training_flops(model, b) for b in timed)
        parameters = sum(p.numel() for p in model.parameters())
        print(
            f"\nmodel={model_name} ({parameters / 1e6:.1f}M parameters),"
            f" data.batch_tokens={cfg.data.batch_tokens}:"
            f" padding efficiency (real / padded tokens) over an epoch's {len(epoch)} batches:"
            f" source {src_efficiency:.3f}, target {tgt_efficiency:.3f}; {args.steps} timed steps,"
            f" {tokens} target tokens, {flops / 1e12:.2f} TFLOP"
        )
        print(f"{'precision':<12}{'loop':<11}{'tokens/s':>10}{'GFLOP/s':>10}{'of peak':>9}")
        for precision in args.precisions:
            # Per step, the fastest of the rounds: other processes on the machine only slow steps down.
            step_seconds: dict[str, list[float]] = {}
            failed: set[str] = set()
            # Alternating rounds, so that neither gains from going second.
            for _ in range(args.rounds):
                for name, run in (("plain", run_plain), ("Lightning", run_lightning)):
                    if name in failed:
                        continue
                    try:
                        elapsed = run(cfg, datamodule, batches, args.warmup, precision, clip, device)
                    except RuntimeError as err:
                        print(f"{precision:<12}{name:<11}failed: {str(err).splitlines()[0][:100]}")
                        failed.add(name)
                        continue
                    step_seconds[name] = list(map(min, elapsed, step_seconds.get(name, elapsed)))
            seconds = {name: sum(steps) for name, steps in step_seconds.items()}
            for name, elapsed in seconds.items():
                rate, speed, peak = flops / elapsed, tokens / elapsed, peaks[precision]
                print(f"{precision:<12}{name:<11}{speed:>10.0f}{rate / 1e9:>10.1f}{rate / peak:>9.1%}")
            if len(seconds) == 2:
                ratio = seconds["plain"] / seconds["Lightning"]
                print(f"{precision:<12}Lightning / plain tokens/s: {ratio:.3f}")


if __name__ == "__main__":
    main()
