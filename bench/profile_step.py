"""Where a training step's time goes: ``torch.profiler`` over a few Bible training steps of a model.

    python bench/profile_step.py [--experiments default attn_bahdanau attn_luong]
        [--precisions 32-true bf16-mixed] [--steps 5] [Hydra overrides...]

For each experiment and precision, the first ``--warmup + --steps`` batches of the Bible split's first
epoch (from seed 0, as bench/step_side_by_side.py trains them; PYTHONPATH=another checkout profiles its
code) go through the module's loss, ``backward`` and AdamW, as bench/train_throughput.py's plain loop
does (no Lightning: its own share is measured there). Prints, per run, the share of the profiled CPU
time of each group of operators (the LSTM kernels, the other matrix products, the loss's softmax, the
attention's elementwise work, copies and concatenations, the optimizer) and the top operators by their
own time, with their call counts: what is the model's work and what is overhead around it.
"""

from __future__ import annotations

import argparse
import contextlib
import re
from collections import defaultdict
from pathlib import Path

import torch
from step_side_by_side import PRECISIONS, first_batches, load, new_module
from torch.profiler import ProfilerActivity, profile

# Operator groups, first match wins (names as the profiler reports them, forward and backward).
GROUPS = (
    ("LSTM kernels", r"lstm|rnn|_thnn_fused"),
    ("matrix products", r"addmm|\bmm\b|aten::mm|bmm|matmul|linear|_mkldnn|onednn"),
    ("softmax / loss", r"softmax|nll|cross_?entropy|logsumexp|gather|scatter"),
    ("elementwise", r"tanh|add|mul|sub|div|sigmoid|masked_fill|exp|where|neg|sum|mean"),
    ("copies / concatenations", r"cat|copy|to\b|_to_copy|clone|contiguous|stack|index|select|slice|view|"
     r"expand|unsqueeze|squeeze|reshape|transpose|permute|empty|zeros|fill|nonzero"),
    ("optimizer", r"adam|_foreach|lerp|addcdiv|sqrt"),
)  # fmt: skip


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, pattern in GROUPS:
        if re.search(pattern, lowered):
            return group
    return "other"


def profile_steps(cfg, datamodule, precision: str, warmup: int, steps: int):
    """The profiler's key averages over ``steps`` training steps after ``warmup`` untimed ones."""
    batches = first_batches(datamodule, warmup + steps)
    module = new_module(cfg, datamodule)
    optimizer = module.configure_optimizers()["optimizer"]
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
    )

    def step(batch) -> None:
        with autocast:
            losses, _ = module.smoothed_losses(batch)
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch in batches[:warmup]:
        step(batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches[warmup:]:
            step(batch)
    return prof.key_averages(), sum(b.num_target_tokens for b in batches[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experiments", nargs="+", default=["default", "attn_bahdanau", "attn_luong"])
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"], choices=PRECISIONS)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=2, help="unprofiled steps first")
    parser.add_argument("--top", type=int, default=12, help="operators listed per run")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.batch_tokens=6000")
    args = parser.parse_args()
    import seq2seq

    code = Path(seq2seq.__file__).resolve().parents[1]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; the code of {code}")
    for experiment in args.experiments:
        cfg, datamodule = load(experiment, args.overrides)
        for precision in args.precisions:
            averages, tokens = profile_steps(cfg, datamodule, precision, args.warmup, args.steps)
            # self time: each operator's own, so that nested calls are not counted twice
            total = sum(e.self_cpu_time_total for e in averages)
            groups: dict[str, float] = defaultdict(float)
            for event in averages:
                groups[group_of(event.key)] += event.self_cpu_time_total
            print(
                f"\n{experiment}, {precision}: {args.steps} steps, {tokens} target tokens,"
                f" {total / 1e6:.2f} s profiled ({tokens / (total / 1e6):.0f} tokens/s under the profiler)"
            )
            for group, micros in sorted(groups.items(), key=lambda item: -item[1]):
                print(f"  {group:<26}{micros / total:>7.1%}")
            print(f"  {'top operators (self time)':<44}{'share':>7}{'calls':>8}")
            for event in sorted(averages, key=lambda e: -e.self_cpu_time_total)[: args.top]:
                share = event.self_cpu_time_total / total
                print(f"    {event.key[:40]:<42}{share:>7.1%}{event.count:>8}")


if __name__ == "__main__":
    main()
