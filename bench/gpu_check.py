"""A machine check in one table: does this GPU train and decode as it should, and how fast?

    bench/gpu_check.sh [--device cuda|cuda:N] [--out DIR] [--cache-dir DIR]
    bench/gpu_check.sh --device cpu      # the same checks at tiny sizes, in about a minute

Rows, each printed as soon as it is measured (a run cut short still shows what it reached):

- the device's peak: a matrix product measured there in bf16, fp16 and fp32, what MFU divides by;
- training tokens/s, MFU and peak memory of ``model=small`` and ``model=base`` through Lightning, in
  bf16-mixed and 16-mixed (bench/train_throughput.py's run on the Bible's first batches);
- a ``trainer=gpu`` run of train.py (300 steps, validation every 100, test scoring of the best
  checkpoint): wall seconds, tokens/s, validation and test BLEU;
- the data loader's wait per step in that run (host time from one step's end to the next one's start);
- beam-5 decoding sentences/s of that run's best checkpoint (bench/decode.py --device);
- peak GPU memory, the highest of all the rows.

On one H100 or H200 it is sized to end within 10 minutes, the Bible's data preparation included
(gpu_check.sh stops it at 10). ``--device cpu`` shrinks the data (500 training verses, 10 test ones),
the steps, the batches and the run's model (tiny), and trains in 32-true, so that
tests/test_bench_gpu_check.py can run every row on a CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from flops import peak_flops
from train_throughput import REPO, build, new_module, run_lightning

from seq2seq.flops import training_flops


@dataclass(frozen=True)
class Sizes:
    """How big each check is on one kind of device."""

    precisions: tuple[str, ...]  # the training rows' precisions
    warmup: int  # untimed training steps before the timed ones
    steps: int  # timed training steps per row
    data: tuple[str, ...] = ()  # overrides for every check's data (the run's and the throughput rows')
    throughput: tuple[str, ...] = ()  # overrides for the throughput rows only
    run: tuple[str, ...] = field(default_factory=tuple)  # the train.py run's overrides
    sentences: int = 1000  # test sentences decoded


GPU = Sizes(
    precisions=("bf16-mixed", "16-mixed"),
    warmup=5,
    steps=30,
    throughput=("data.batch_tokens=12000",),  # trainer=gpu's batches
    run=("trainer=gpu", "trainer.max_steps=300", "trainer.val_check_interval=100"),
)
CPU = Sizes(
    precisions=("32-true",),
    warmup=1,
    steps=1,
    data=(
        "+data.corpus.train_size=500", "data.corpus.valid_size=10", "data.corpus.test_size=10",
        "data.subword.vocab_size=300", "data.max_len=48",
    ),
    throughput=("data.batch_tokens=100",),
    # short outputs and a fixed alpha: an untrained model's translations run to their length limit
    run=(
        "trainer=cpu", "model=tiny", "trainer.max_steps=10", "trainer.val_check_interval=5",
        "trainer.max_time=null", "trainer.precision=32-true", "decoding.alpha=1.0", "decoding.max_len_a=0.5",
        "decoding.max_len_b=5",
    ),
    sentences=10,
)  # fmt: skip

WIDTHS = (34, 52, 7, 10)  # check, result, MFU, peak memory


def row(check: str, result: str, mfu: str = "", memory: str = "") -> None:
    """One line of the table, printed at once."""
    cells = (check, result, mfu, memory)
    line = "".join(
        f"{cell:<{w}}" if i < 2 else f"{cell:>{w}}"
        for i, (cell, w) in enumerate(zip(cells, WIDTHS, strict=True))
    )
    print(line.rstrip(), flush=True)


def gib(size: int | None) -> str:
    return "" if size is None else f"{size / 2**30:.2f} GiB"


class StepWaits(L.Callback):
    """Host seconds each training step waited for its batch (from the previous step's end to its own start:
    the loader's next batch and its copy to the device; not after a validation) and spent in the step, and
    the peak GPU memory; written as JSON to ``path`` when training ends. Added to the run by
    ``+callbacks.step_waits._target_=gpu_check.StepWaits`` with bench/ on PYTHONPATH."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.waits: list[float] = []
        self.steps: list[float] = []
        self.ended: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        self.started = time.perf_counter()
        if self.ended is not None:
            self.waits.append(self.started - self.ended)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        self.ended = time.perf_counter()
        self.steps.append(self.ended - self.started)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ended = None  # the next step waited for the validation, not for the loader

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cuda = pl_module.device.type == "cuda"
        record = {
            "waits": self.waits,
            "steps": self.steps,
            "peak_memory": torch.cuda.max_memory_allocated(pl_module.device) if cuda else None,
        }
        Path(self.path).write_text(json.dumps(record), encoding="utf-8")


def check_peak(device: torch.device) -> None:
    peaks = {name: peak_flops(name, device) for name in ("bf16", "fp16", "fp32")}
    row(
        "matmul peak (measured)",
        ", ".join(f"{name} {peak / 1e12:.3g}" for name, peak in peaks.items()) + " TFLOP/s",
    )


def check_training(device: torch.device, sizes: Sizes, model: str) -> int | None:
    """Training rows of ``model``, one per precision; returns the highest peak memory (GPU) or None."""
    datamodule, cfg, clip = build(model, [*sizes.data, *sizes.throughput])
    split = datamodule.splits["train"]
    epoch = datamodule._batch_sampler(split, "train").batches(epoch=0)
    batches = [split.collate(indices) for indices in epoch[: sizes.warmup + sizes.steps]]
    timed = batches[sizes.warmup :]
    tokens = sum(b.num_target_tokens for b in timed)
    flops = sum(training_flops(new_module(cfg, datamodule).model, b) for b in timed)
    highest = None
    for precision in sizes.precisions:
        check = f"train model={model} {precision}"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            seconds = sum(run_lightning(cfg, datamodule, batches, sizes.warmup, precision, clip, device))
        except RuntimeError as error:
            row(check, f"failed: {str(error).splitlines()[0][:80]}")
            continue
        memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        highest = max(highest or 0, memory or 0) if memory is not None else highest
        mfu = flops / seconds / peak_flops(precision, device)
        row(check, f"{tokens / seconds:,.0f} tokens/s ({len(timed)} steps)", f"{mfu:.1%}", gib(memory))
    return highest


def check_run(device: torch.device, sizes: Sizes, out: Path, cache: Path) -> tuple[dict, dict] | None:
    """The train.py run: its result.json and its StepWaits record (None: it failed, said in a row)."""
    run_dir, waits = out / "run", out / "step_waits.json"
    command = [
        sys.executable, "train.py", *sizes.data, *sizes.run, f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={cache}", "evaluate.validate_every_epoch=false",
        "trainer.enable_progress_bar=false",
        "+callbacks.step_waits._target_=gpu_check.StepWaits", f"+callbacks.step_waits.path={waits}",
    ]  # fmt: skip
    if device.type == "cuda" and device.index is not None:
        command.append(f"trainer.devices=[{device.index}]")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "bench"), os.environ.get("PYTHONPATH", "")]),
    }
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    check = f"run {' '.join(sizes.run[:2])}"
    if result.returncode != 0 or not (run_dir / "result.json").is_file():
        row(
            check,
            f"failed (exit {result.returncode}): {(result.stderr.strip().splitlines() or [''])[-1][:60]}",
        )
        (out / "run.log").write_text(result.stdout + result.stderr, encoding="utf-8")
        return None
    record = json.loads((run_dir / "result.json").read_text(encoding="utf-8"))
    steps = json.loads(waits.read_text(encoding="utf-8"))
    row(
        check,
        f"{seconds:.0f} s, {record['steps']} steps, {record['tokens_per_second']:,.0f} tokens/s;"
        f" BLEU val {record['val_bleu']:.2f}, test {record.get('test_bleu', float('nan')):.2f}",
        "",
        gib(steps["peak_memory"]),
    )
    wait_ms = [1000 * w for w in steps["waits"]]
    share = sum(steps["waits"]) / (sum(steps["waits"]) + sum(steps["steps"]))
    row(
        "data loader wait per step",
        f"median {statistics.median(wait_ms):.2f} ms, mean {statistics.mean(wait_ms):.2f} ms"
        f" ({share:.1%} of training)",
    )
    return record, steps


BEAM_ROW = re.compile(r"^beam 5, batched\s+\S+\s+[\d.]+\s+([\d.]+)", re.MULTILINE)


def check_decoding(device: torch.device, sizes: Sizes, checkpoint: str) -> None:
    command = [
        sys.executable, "bench/decode.py", "--ckpt", checkpoint, "--device", str(device), "--beam", "5",
        "--limit", str(sizes.sentences), "--repeats", "1", "--skip-alpha", "--skip-one-by-one",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    found = BEAM_ROW.search(result.stdout)
    if result.returncode != 0 or found is None:
        row(
            "decode beam 5 (bench/decode.py)",
            f"failed: {(result.stderr.strip().splitlines() or [''])[-1][:60]}",
        )
        return
    row(
        "decode beam 5 (bench/decode.py)",
        f"{float(found[1]):,.1f} sentences/s ({sizes.sentences} test sentences)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda (the default), cuda:N or cpu (tiny sizes)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu_check"), help="the run's folder goes here")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("SEQ2SEQ_CACHE_DIR", REPO / ".cache")),
        help="prepared data (the Bible's, reused when there)",
    )
    args = parser.parse_args()
    # the table alone on the terminal: no Lightning banners or library warnings between its rows
    logging.getLogger("lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "error: --device cuda: torch sees no GPU here (--device cpu runs the checks on the CPU)"
        )
    sizes = CPU if device.type == "cpu" else GPU
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["SEQ2SEQ_CACHE_DIR"] = str(args.cache_dir)  # build() reads it
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"gpu_check on {args.device} ({name}); torch {torch.__version__}, CUDA {torch.version.cuda}",
        flush=True,
    )
    row("check", "result", "MFU", "peak mem")
    check_peak(device)
    memories = [check_training(device, sizes, model) for model in ("small", "base")]
    run = check_run(device, sizes, args.out, args.cache_dir)
    if run is not None:
        memories.append(run[1]["peak_memory"])
        check_decoding(device, sizes, run[0]["checkpoint"])
    known = [m for m in memories if m is not None]
    row(
        "peak GPU memory",
        "highest of the rows above" if known else "- (no GPU)",
        "",
        gib(max(known, default=None)),
    )


if __name__ == "__main__":
    main()
