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
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
SUMMARY_FILE = "summary.csv"
COLUMNS = (
    "trial", "status", "val_bleu", "test_bleu", "train_minutes", "steps", "tokens_per_second", "parameters",
    "checkpoint",
    "overrides",  # the swept keys' values only
    "error",
)  # fmt: skip


def write_result(output_dir: str | Path, **fields: Any) -> None:
    """Record a run's outcome (``status`` plus any of COLUMNS) and all its overrides in its output folder."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    record = {"overrides": overrides, **fields}
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    Path(output_dir, RESULT_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")


def swept_keys(config: DictConfig) -> set[str]:
    """The keys a multirun varies: its sweep overrides (``key=a,b``, ``range(...)``, ...) and the
    sweeper's declared search space (``hydra.sweeper.params``, as the Optuna sweeper has)."""
    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = {override.key_or_group for override in parsed if override.is_sweep_override()}
    return keys | set(config.hydra.sweeper.get("params") or {})


def collect_results(sweep_dir: str | Path, swept: set[str] | None = None) -> list[dict[str, Any]]:
    """Trial records under ``sweep_dir``: completed ones by validation BLEU, best first, then failed.

    The overrides column holds only the ``swept`` keys' values (without ``swept``: the overrides whose
    values differ between trials), not the constant overrides repeated in every row.
    """
    records = {}
    for path in Path(sweep_dir).glob(f"*/{RESULT_FILE}"):
        records[path.parent.name] = json.loads(path.read_text(encoding="utf-8"))
    trial_overrides = {trial: overrides_of(record) for trial, record in records.items()}
    if swept is None:
        keys = {key for overrides in trial_overrides.values() for key in overrides}
        swept = {k for k in keys if len({str(o.get(k)) for o in trial_overrides.values()}) > 1}
    rows = []
    for trial, record in records.items():
        shown = " ".join(f"{k}={v}" for k, v in trial_overrides[trial].items() if k.lstrip("+~") in swept)
        rows.append(
            {column: record.get(column, "") for column in COLUMNS} | {"trial": trial, "overrides": shown}
        )

    def rank(row: dict[str, Any]) -> tuple[int, float]:
        ok = row["status"] == "ok" and isinstance(row["val_bleu"], float) and math.isfinite(row["val_bleu"])
        return (0, -row["val_bleu"]) if ok else (1, 0.0)

    return sorted(rows, key=rank)


def overrides_of(record: dict[str, Any]) -> dict[str, str]:
    """A trial's overrides as {key: value}, in command-line order."""
    overrides = record.get("overrides", [])
    overrides = overrides.split() if isinstance(overrides, str) else overrides  # older result files
    return dict(override.split("=", 1) for override in overrides if "=" in override)


def write_summary(sweep_dir: str | Path, swept: set[str] | None = None) -> list[dict[str, Any]]:
    rows = collect_results(sweep_dir, swept)
    with open(Path(sweep_dir, SUMMARY_FILE), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def format_summary(rows: list[dict[str, Any]]) -> str:
    """The summary as a text table; tokens/s shows a trial that other work on the machine slowed down."""
    header = f"{'trial':>5}  {'status':<11}  {'val BLEU':>8}  {'test BLEU':>9}  {'minutes':>7}  {'steps':>6}"
    lines = [f"{header}  {'tokens/s':>8}  {'parameters':>11}  swept values"]

    def shown(value: Any, spec: str, width: int) -> str:
        return f"{value:{spec}}".rjust(width) if isinstance(value, int | float) else "-".rjust(width)

    for row in rows:
        numbers = "  ".join(
            (
                shown(row["val_bleu"], ".2f", 8),
                shown(row["test_bleu"], ".2f", 9),
                shown(row["train_minutes"], ".1f", 7),
                shown(row["steps"], ",", 6),
                shown(row["tokens_per_second"], ",.0f", 8),
                shown(row["parameters"], ",", 11),
            )
        )
        detail = row["overrides"] + (f"  [{row['error']}]" if row["error"] else "")
        lines.append(f"{row['trial']:>5}  {row['status']:<11}  {numbers}  {detail}")
    return "\n".join(lines)


class SweepSummary(Callback):
    """Rewrites ``summary.csv`` in the sweep folder after every trial, and prints it at the end."""

    def __init__(self) -> None:
        self.swept: set[str] | None = None  # known where the multirun started (not in a SLURM job)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.swept = swept_keys(config)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        hydra_config = HydraConfig.get()
        if hydra_config.mode == RunMode.MULTIRUN:
            write_summary(hydra_config.sweep.dir, self.swept)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_summary(sweep_dir, swept_keys(config))
        print(f"Sweep summary ({sweep_dir / SUMMARY_FILE}), best first:\n{format_summary(rows)}")
