"""Sweep bookkeeping: each trial leaves a ``result.json``; a Hydra callback gathers them into a table.

Trials record themselves, in their own output folders, so the summary works with any Hydra launcher
(in-process, or SLURM jobs through submitit) and also after an interrupted sweep.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
SUMMARY_FILE = "summary.csv"
COLUMNS = ("trial", "status", "val_bleu", "train_minutes", "parameters", "checkpoint", "overrides", "error")


def write_result(output_dir: str | Path, **fields: Any) -> None:
    """Record a run's outcome (``status`` plus any of COLUMNS) in its output folder."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    record = {"overrides": " ".join(overrides), **fields}
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    Path(output_dir, RESULT_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")


def collect_results(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Trial records under ``sweep_dir``: completed ones by validation BLEU, best first, then failed."""
    rows = []
    for path in Path(sweep_dir).glob(f"*/{RESULT_FILE}"):
        record = json.loads(path.read_text(encoding="utf-8"))
        rows.append({column: record.get(column, "") for column in COLUMNS} | {"trial": path.parent.name})

    def rank(row: dict[str, Any]) -> tuple[int, float]:
        ok = row["status"] == "ok" and isinstance(row["val_bleu"], float) and math.isfinite(row["val_bleu"])
        return (0, -row["val_bleu"]) if ok else (1, 0.0)

    return sorted(rows, key=rank)


def write_summary(sweep_dir: str | Path) -> list[dict[str, Any]]:
    rows = collect_results(sweep_dir)
    with open(Path(sweep_dir, SUMMARY_FILE), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def format_summary(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'trial':>5}  {'status':<6}  {'val BLEU':>8}  {'minutes':>7}  {'parameters':>11}  overrides"]
    for row in rows:
        bleu = f"{row['val_bleu']:.2f}" if isinstance(row["val_bleu"], float) else "-"
        minutes = f"{row['train_minutes']:.1f}" if isinstance(row["train_minutes"], float) else "-"
        params = f"{row['parameters']:,}" if isinstance(row["parameters"], int) else "-"
        detail = row["overrides"] + (f"  [{row['error']}]" if row["error"] else "")
        lines.append(
            f"{row['trial']:>5}  {row['status']:<6}  {bleu:>8}  {minutes:>7}  {params:>11}  {detail}"
        )
    return "\n".join(lines)


class SweepSummary(Callback):
    """Rewrites ``summary.csv`` in the sweep folder after every trial, and prints it at the end."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        hydra_config = HydraConfig.get()
        if hydra_config.mode == RunMode.MULTIRUN:
            write_summary(hydra_config.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_summary(sweep_dir)
        print(f"Sweep summary ({sweep_dir / SUMMARY_FILE}), best first:\n{format_summary(rows)}")
