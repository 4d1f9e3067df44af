"""The cost of subword regularization (data.subword_sampling) on the Bible split, in target tokens/s.

    python bench/subword_sampling.py [--model small] [--steps 10] [--alpha 0.1] [--nbest -1]
        [--batching-only] [Hydra overrides]

Measures, on the first ``--warmup + --steps`` batches of epoch 0: (1) building the batches: from the
prepared cache (the default path) against sampling each pair's segmentation from its text; (2) training
on them (bench/train_throughput.py's plain loop over this project's module, fp32): sampled
segmentations are longer and a batch's sources no longer share one length, so the encoder packs them.
"""

from __future__ import annotations

import argparse
import time

import torch
from train_throughput import build, run_plain


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="small")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--nbest", type=int, default=-1)
    parser.add_argument("--batching-only", action="store_true", help="skip the training measurement")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    datamodule, cfg, clip = build(
        args.model, [f"data.subword_sampling={{alpha:{args.alpha},nbest:{args.nbest}}}", *args.overrides]
    )
    split, resampled = datamodule.splits["train"], datamodule.resampled
    plan = datamodule._batch_sampler(split, "train").batches(epoch=0)[: args.warmup + args.steps]
    started = time.perf_counter()
    cached = [split.collate(indices) for indices in plan]
    cache_seconds = time.perf_counter() - started
    started = time.perf_counter()
    sampled = [resampled.collate((0, indices)) for indices in plan]
    sample_seconds = time.perf_counter() - started
    for name, batches, seconds in (("cache", cached, cache_seconds), ("sampled", sampled, sample_seconds)):
        tokens = sum(b.num_target_tokens for b in batches)
        print(f"batching from the {name:<8}: {tokens / seconds:>12,.0f} target tokens/s ({tokens} tokens)")
    ratio = sum(b.num_target_tokens for b in sampled) / sum(b.num_target_tokens for b in cached)
    print(f"target tokens, sampled / cached segmentation: {ratio:.2f}")
    if args.batching_only:
        return
    for name, batches in (("cache", cached), ("sampled", sampled)):
        step_seconds = run_plain(cfg, datamodule, batches, args.warmup, "32-true", clip)
        tokens = sum(b.num_target_tokens for b in batches[args.warmup :])
        rate = tokens / sum(step_seconds)
        print(f"training on {name:<8} batches: {rate:>8,.0f} target tokens/s ({tokens} tokens)")


if __name__ == "__main__":
    main()
