"""Checkpoint files: reading them with errors that name the file, and the edits a run makes to them
(``last.ckpt`` at the end of training, the chosen length penalty in the best checkpoint)."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seq2seq.errors import MissingFileError, UserError, user_path
from seq2seq.files import atomic_write

if TYPE_CHECKING:
    import lightning as L
    import torch

    from seq2seq.module import TranslationModule

# What loading a truncated, corrupt or foreign checkpoint raises.
UNLOADABLE_CHECKPOINT = (
    RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile,
)  # fmt: skip


def require_file(path: str | Path) -> Path:
    """``path`` as a Path; MissingFileError naming it if there is no such file, or a UserError
    listing the checkpoints inside if it is a folder (a run directory given for its checkpoint)."""
    path = Path(path)
    if path.is_dir():
        # In it, or two levels down: a run directory's checkpoints/best-*.ckpt.
        inside = sorted(
            str(p.relative_to(path)) for depth in ("", "*/", "*/*/") for p in path.glob(f"{depth}*.ckpt")
        )
        more = f" and {len(inside) - 8} more" if len(inside) > 8 else ""
        listed = f"checkpoints in it: {', '.join(inside[:8])}{more}" if inside else "no .ckpt file in it"
        raise UserError(f"Checkpoint path is a directory: {path} ({listed})")
    if not path.is_file():
        raise MissingFileError(f"Checkpoint not found: {path}")
    return path


def read_checkpoint(
    path: str | Path, required: Sequence[str] = ("state_dict", "tokenizer")
) -> dict[str, Any]:
    """The checkpoint dict at ``path``; a UserError naming the path if it is missing, unreadable, or
    lacks the ``required`` entries of this toolkit's checkpoints."""
    import torch  # here, so that require_file answers before torch loads (translate.py's early checks)

    require_file(path)
    try:
        with user_path(path):
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except UNLOADABLE_CHECKPOINT as err:
        raise UserError(f"Cannot load checkpoint {path}: truncated or not a checkpoint ({err})") from None
    missing = [key for key in required if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise UserError(f"{path} is not a checkpoint of this toolkit (no {missing})")
    return checkpoint


def load_module(path: str | Path, device: str | torch.device = "cpu") -> TranslationModule:
    """The TranslationModule of a checkpoint, with a clear error for a missing or unusable file."""
    from seq2seq.module import TranslationModule  # the Lightning side stays out of plain use

    path = require_file(path)
    try:
        with user_path(path):
            return TranslationModule.load_from_checkpoint(path, map_location=device, weights_only=False)
    except UNLOADABLE_CHECKPOINT as err:
        raise UserError(
            f"Cannot load checkpoint {path}: not a complete checkpoint of this toolkit ({err})"
        ) from None


def check_resume_checkpoint(path: str, max_time: str | timedelta | None = None) -> None:
    """Fail clearly, before training starts, if ``ckpt_path`` is not a training checkpoint of ours, or if
    the run it resumes has already used up ``max_time`` (``trainer.max_time`` counts the whole run:
    Lightning's Timer carries the time trained in the checkpoint)."""
    from lightning.pytorch.callbacks import Timer

    from seq2seq.callbacks import clock

    try:
        checkpoint = read_checkpoint(path, required=("state_dict", "tokenizer", "loops"))
    except UserError as err:
        raise type(err)(f"ckpt_path: {err}") from None
    timer_state = checkpoint.get("callbacks", {}).get(Timer.__qualname__)  # Timer's state_key
    if max_time is None or timer_state is None:
        return
    timer = Timer(duration=max_time)
    timer.load_state_dict(timer_state)
    if timer.time_remaining() <= 0:
        raise UserError(
            f"ckpt_path: the run has already trained for {clock(timer.time_elapsed())}, all of"
            f" trainer.max_time={max_time}, which counts the whole run across resumes: give a larger"
            " trainer.max_time to train on"
        )


def read_init_checkpoint(path: str) -> dict[str, Any]:
    """The checkpoint ``init_from`` names (weights, tokenizer and model settings); a one-line error
    naming the option if it is missing or not a checkpoint of this toolkit's translation models."""
    try:
        checkpoint = read_checkpoint(path, required=("state_dict", "tokenizer", "hyper_parameters"))
    except UserError as err:
        raise type(err)(f"init_from: {err}") from None
    if not isinstance(checkpoint["hyper_parameters"].get("model"), dict):
        raise UserError(f"init_from: {path} is not a checkpoint of this toolkit (no model settings)")
    return checkpoint


def check_architecture(
    composed: dict[str, Any], checkpoint: dict[str, Any], overrides: Sequence[str]
) -> None:
    """Fine-tuning takes the model's architecture from the checkpoint: a ``model.KEY=VALUE`` (or
    ``model=NAME``) command-line override that asks for another is a ValueError naming the key.

    ``composed`` is the composed ``model`` config, ``checkpoint`` the checkpoint's, ``overrides`` the
    command line's overrides (Hydra's ``overrides.task``); settings only the config files set differ
    freely (the checkpoint's win).
    """
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key == "model":
            differing = [
                k for k in sorted(composed.keys() | checkpoint.keys()) if composed.get(k) != checkpoint.get(k)
            ]
            if differing:
                first = differing[0]
                raise UserError(
                    f"init_from: {override} conflicts with the checkpoint's architecture (model.{first}:"
                    f" {composed.get(first)!r} here, {checkpoint.get(first)!r} in the checkpoint); drop it"
                )
        elif key.startswith("model."):
            path = key.removeprefix("model.").split(".")
            here, there = composed, checkpoint
            for part in path:
                here = here.get(part) if isinstance(here, dict) else None
                there = there.get(part) if isinstance(there, dict) else None
            if here != there:
                raise UserError(
                    f"init_from: {key}={value} conflicts with the checkpoint's {key}={there!r}: the"
                    " architecture comes from the checkpoint; drop the override"
                )


def save_last_checkpoint(trainer: L.Trainer) -> None:
    """Write ``last.ckpt`` now that training has ended (Lightning saves it at the end only if it never did).

    When training ended with an epoch, the epoch loop still counts that epoch's batches; saved so, a
    resumed run would find the next epoch already at its end, skip it, and draw the following epoch's
    batch order. So the counts are first reset as Lightning resets them when an epoch starts.
    """
    from seq2seq.private_apis import restart_finished_epoch

    restart_finished_epoch(trainer)
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "save_last", False):
            trainer.save_checkpoint(Path(callback.dirpath) / "last.ckpt")


def store_alpha(path: str | Path, alpha: float, bleu_by_alpha: dict[float, float]) -> None:
    """Write a chosen length penalty into a checkpoint's decoding settings (where translate.py's
    ``alpha=auto`` finds it), with the BLEU of each alpha it was chosen from; the file is replaced
    atomically."""
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint["hyper_parameters"]["decoding"]["alpha"] = alpha
    checkpoint["alpha_choice"] = {"alpha": alpha, "bleu_by_alpha": bleu_by_alpha}
    with atomic_write(path) as file:
        torch.save(checkpoint, file)
