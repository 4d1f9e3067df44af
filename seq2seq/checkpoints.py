"""Reading checkpoint files with errors that name the file."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from seq2seq.module import TranslationModule

# What loading a truncated, corrupt or foreign checkpoint raises.
UNLOADABLE_CHECKPOINT = (
    RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile,
)  # fmt: skip


def require_file(path: str | Path) -> Path:
    """``path`` as a Path; FileNotFoundError naming it if there is no such file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    return Path(path)


def read_checkpoint(
    path: str | Path, required: Sequence[str] = ("state_dict", "tokenizer")
) -> dict[str, Any]:
    """The checkpoint dict at ``path``; FileNotFoundError or ValueError naming the path if it is missing,
    unreadable, or lacks the ``required`` entries of this toolkit's checkpoints."""
    import torch  # here, so that require_file answers before torch loads (translate.py's early checks)

    require_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except UNLOADABLE_CHECKPOINT as err:
        raise ValueError(f"Cannot load checkpoint {path}: truncated or not a checkpoint ({err})") from None
    missing = [key for key in required if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise ValueError(f"{path} is not a checkpoint of this toolkit (no {missing})")
    return checkpoint


def load_module(path: str | Path, device: str | torch.device = "cpu") -> TranslationModule:
    """The TranslationModule of a checkpoint, with a clear error for a missing or unusable file."""
    from seq2seq.module import TranslationModule  # the Lightning side stays out of plain use

    path = require_file(path)
    try:
        return TranslationModule.load_from_checkpoint(path, map_location=device, weights_only=False)
    except UNLOADABLE_CHECKPOINT as err:
        raise ValueError(
            f"Cannot load checkpoint {path}: not a complete checkpoint of this toolkit ({err})"
        ) from None
