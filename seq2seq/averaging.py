"""Checkpoint averaging: one model whose weights are the mean of several checkpoints' weights.

    python -m seq2seq.averaging --output averaged.ckpt outputs/.../checkpoints/best-*.ckpt

Averaging the last or best few checkpoints of one run usually scores a little higher than any one of
them. The result holds the weights, the tokenizer and the run's configuration, like a checkpoint
written by training, so ``translate.py`` and :class:`~seq2seq.translator.Translator` use it as any
other; it carries no optimizer state, so training cannot be resumed from it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from seq2seq.checkpoints import read_checkpoint
from seq2seq.cli import run_cli
from seq2seq.errors import UserError, user_path
from seq2seq.files import atomic_write

# Resuming state that means nothing for an average.
TRAINING_STATE = ("optimizer_states", "lr_schedulers", "loops", "callbacks")


def average_checkpoints(paths: Sequence[str | Path], output: str | Path) -> None:
    """Write to ``output`` the first checkpoint with every weight replaced by the mean over ``paths``.

    All checkpoints must have the same parameters (names and shapes) and the same tokenizer.
    """
    if not paths:
        raise UserError("checkpoint averaging needs at least one checkpoint")
    first = read_checkpoint(paths[0])
    total = {name: weights.double() for name, weights in first["state_dict"].items()}
    for path in paths[1:]:
        checkpoint = read_checkpoint(path)
        if checkpoint.get("tokenizer") != first.get("tokenizer"):
            raise UserError(f"{path} has another sentencepiece model than {paths[0]}: cannot average them")
        weights = checkpoint["state_dict"]
        if {n: w.shape for n, w in weights.items()} != {n: w.shape for n, w in total.items()}:
            raise UserError(f"{path} has other parameters (names or shapes) than {paths[0]}")
        for name in total:
            total[name] += weights[name].double()
    first["state_dict"] = {
        name: (weights / len(paths)).to(first["state_dict"][name].dtype) for name, weights in total.items()
    }
    for key in TRAINING_STATE:
        first.pop(key, None)
    first["averaged_from"] = [str(path) for path in paths]
    with user_path(output, "--output"), atomic_write(output) as file:  # a file that exists is complete
        torch.save(first, file)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoints", nargs="+", help="checkpoints of one model (e.g. one run's)")
    parser.add_argument("--output", required=True, help="where to write the averaged checkpoint")
    args = parser.parse_args()
    average_checkpoints(args.checkpoints, args.output)
    print(f"Averaged {len(args.checkpoints)} checkpoints into {args.output}")


if __name__ == "__main__":
    run_cli(main)
