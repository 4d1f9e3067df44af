"""What the bench scripts that train with train.py share: a timed run in its own folder that resumes from
its last.ckpt when started again, the overrides that choose its prepared data, whether it has finished,
and its best checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def train_command(folder: Path, minutes: float, overrides: list[str]) -> list[str]:
    """train.py into ``folder`` for ``minutes`` of training (``trainer.max_time`` counts them across
    resumes), continuing from the folder's last.ckpt if an earlier start left one."""
    seconds = round(minutes * 60)
    last = folder / "checkpoints" / "last.ckpt"
    return [
        sys.executable, "train.py", *overrides, "trainer.enable_progress_bar=false",
        f"trainer.max_time=00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}",
        f"hydra.run.dir={folder}", *([f"ckpt_path={last}"] if last.exists() else []),
    ]  # fmt: skip


def data_overrides(overrides: list[str]) -> list[str]:
    """The overrides that choose the prepared data (``seq2seq.prepare`` knows no model keys)."""
    return [override for override in overrides if override.startswith("data.")]


def trained(folder: Path) -> bool:
    """Whether train.py finished the run in ``folder`` (trained and scored it)."""
    result = folder / "result.json"
    return result.exists() and json.loads(result.read_text())["status"] == "ok"


def best_checkpoint(folder: Path) -> Path:
    """The run's best checkpoint (the newest ``best-*.ckpt``: training keeps only the best)."""
    return max((folder / "checkpoints").glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
