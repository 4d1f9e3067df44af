"""A training step's speed and losses: this checkout against another commit, side by side in one run.

    python bench/step_side_by_side.py --against REF [--experiments default attn_bahdanau attn_luong]
        [--precisions 32-true bf16-mixed] [--steps 20] [--warmup 3] [--rounds 3] [Hydra overrides...]

REF (e.g. main's head before a change) is checked out into a temporary git worktree. For each
experiment and precision, in alternating rounds, one fresh process per tree (its own code and conf/)
trains the same first ``--warmup + --steps`` batches of the Bible split's first epoch from the same
seed: the module's loss, ``backward``, gradient clipping and AdamW (bench/train_throughput.py's plain
loop: what Lightning adds around it is the same in both trees). Per step the fastest time over the
rounds is kept (load from other processes only slows steps down). Prints each tree's target tokens/s,
their ratio, and the largest difference of the training loss between the trees over the steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
PRECISIONS = ("32-true", "bf16-mixed")


def load(experiment: str, overrides: list[str]) -> tuple[Any, Any]:
    """The config and prepared Bible data of ``experiment`` (``default``: none), as the seq2seq package
    on sys.path composes them from its own conf/ (so another commit's code reads its own configs)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import seq2seq

    tree = Path(seq2seq.__file__).resolve().parents[1]
    extra = [] if experiment == "default" else [f"experiment={experiment}"]
    cache = os.environ.get("SEQ2SEQ_CACHE_DIR", str(HERE.parents[1] / ".cache"))
    with initialize_config_dir(config_dir=str(tree / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[*extra, "paths.output_dir=/tmp/bench", f"paths.cache_dir={cache}", *overrides],
        )
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    return cfg, datamodule


def first_batches(datamodule: Any, count: int) -> list:
    """The first ``count`` batches of the training split's first epoch."""
    split = datamodule.splits["train"]
    epoch = datamodule._batch_sampler(split, "train").batches(epoch=0)
    return [split.collate(indices) for indices in epoch[:count]]


def new_module(cfg: Any, datamodule: Any) -> Any:
    """The model to train, from seed 0, in training mode, with the data's tokenizer."""
    import torch
    from hydra.utils import instantiate

    torch.manual_seed(0)
    tokenizer = datamodule.tokenizer
    module = instantiate(
        cfg.module,
        src_vocab_size=tokenizer.src_vocab_size,
        tgt_vocab_size=tokenizer.tgt_vocab_size,
        _convert_="all",
    )
    module.tokenizer = tokenizer
    return module.train()


def train_steps(experiment: str, precision: str, warmup: int, steps: int, overrides: list[str]) -> dict:
    """In a worker process: time ``steps`` training steps after ``warmup`` with the code on sys.path."""
    import torch

    import seq2seq

    cfg, datamodule = load(experiment, overrides)
    batches = first_batches(datamodule, warmup + steps)
    module = new_module(cfg, datamodule)
    optimizer = module.configure_optimizers()["optimizer"]
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
    )
    seconds, losses = [], []
    for batch in batches:
        start = time.perf_counter()
        with autocast:
            token_losses, _ = module.smoothed_losses(batch)
        loss = token_losses.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), float(cfg.trainer.gradient_clip_val))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    timed = batches[warmup:]
    return {
        "code": str(Path(seq2seq.__file__).resolve().parents[1]),
        "seconds": seconds[warmup:],
        "tokens": sum(b.num_target_tokens for b in timed),
        "losses": losses,
    }


def run_worker(tree: Path, args: argparse.Namespace, experiment: str, precision: str) -> dict:
    """One measurement in a fresh process that imports ``tree``'s seq2seq (PYTHONPATH comes before the
    editable install of this checkout)."""
    command = [
        sys.executable, str(HERE), "--worker", "--experiments", experiment, "--precisions", precision,
        "--steps", str(args.steps), "--warmup", str(args.warmup), *args.overrides,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"the run in {tree} failed:\n{result.stderr[-3000:]}")
    record = json.loads(result.stdout.strip().splitlines()[-1])
    if Path(record["code"]) != tree:
        raise SystemExit(f"the run meant for {tree} imported {record['code']}")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--against", help="the commit to compare with (required but in --worker mode)")
    parser.add_argument("--experiments", nargs="+", default=["default", "attn_bahdanau", "attn_luong"])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds; per step, the fastest is kept"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both trees")
    args = parser.parse_args()
    if args.worker:
        record = train_steps(args.experiments[0], args.precisions[0], args.warmup, args.steps, args.overrides)
        print(json.dumps(record))
        return
    if not args.against:
        parser.error("--against REF is required")
    this = HERE.parents[1]
    commit = subprocess.run(
        ["git", "-C", str(this), "rev-parse", "--short", args.against],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    here = subprocess.run(
        ["git", "-C", str(this), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    import torch

    print(f"this checkout ({here}) against {args.against} ({commit}); torch {torch.__version__},")
    print(
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {args.steps} timed steps,"
        f" {args.rounds} rounds"
    )
    with tempfile.TemporaryDirectory() as scratch:
        ref = Path(scratch, "ref")
        subprocess.run(
            ["git", "-C", str(this), "worktree", "add", "--detach", str(ref), commit],
            check=True,
            capture_output=True,
        )
        try:
            against = f"{args.against} tok/s"
            print(
                f"{'experiment':<16}{'precision':<12}{against:>14}{'this tok/s':>12}{'ratio':>8}"
                f"{'max |loss diff|':>17}"
            )
            for experiment in args.experiments:
                for precision in args.precisions:
                    fastest: dict[Path, list[float]] = {}
                    records: dict[Path, dict] = {}
                    for _ in range(args.rounds):
                        for tree in (ref, this):  # alternating, so that neither gains from going second
                            record = run_worker(tree, args, experiment, precision)
                            previous = fastest.get(tree, record["seconds"])
                            fastest[tree] = list(map(min, previous, record["seconds"]))
                            records[tree] = record
                    speed = {tree: records[tree]["tokens"] / sum(fastest[tree]) for tree in (ref, this)}
                    difference = max(
                        abs(a - b)
                        for a, b in zip(records[ref]["losses"], records[this]["losses"], strict=True)
                    )
                    print(
                        f"{experiment:<16}{precision:<12}{speed[ref]:>14.0f}{speed[this]:>12.0f}"
                        f"{speed[this] / speed[ref]:>8.2f}{difference:>17.2e}",
                        flush=True,
                    )
        finally:
            subprocess.run(["git", "-C", str(this), "worktree", "remove", "--force", str(ref)], check=False)


if __name__ == "__main__":
    main()
