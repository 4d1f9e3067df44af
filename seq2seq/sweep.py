"""Sweep bookkeeping: each trial leaves a ``result.json``; a Hydra callback gathers them into a table.

Trials record themselves, in their own output folders, so the summary works with any Hydra launcher
(in-process, or SLURM jobs through submitit) and also after an interrupted sweep.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
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
# Then one column per swept key, named by short_names; a pruned trial's steps are its last step.
COLUMNS = (
    "trial", "status", "val_bleu", "test_bleu", "train_minutes", "steps", "tokens_per_second", "parameters",
    "checkpoint",
    "validations",  # a sweep trial's validations, step:BLEU
    "error",
)  # fmt: skip
# Best first: complete trials by validation BLEU, then pruned ones by their best validation, then the rest.
STATUS_ORDER = {"ok": 0, "pruned": 1}


def write_result(output_dir: str | Path, **fields: Any) -> None:
    """Record a run's outcome (``status`` plus any of COLUMNS) and all its overrides in its output folder."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    record = {"overrides": overrides, **fields}
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    Path(output_dir, RESULT_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")


def swept_keys(config: DictConfig) -> set[str]:
    """The keys a multirun varies: its sweep overrides (``key=a,b``, ``range(...)``, ...) and the
    sweeper's declared search space (``hydra.sweeper.params``, as the Optuna sweeper has) but for the
    keys the command line sets to one value."""
    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = {override.key_or_group for override in parsed if override.is_sweep_override()}
    fixed = {override.key_or_group for override in parsed if not override.is_sweep_override()}
    return keys | (set(config.hydra.sweeper.get("params") or {}) - fixed)


def collect_results(sweep_dir: str | Path, swept: set[str] | None = None) -> list[dict[str, Any]]:
    """Trial records under ``sweep_dir``, best first (STATUS_ORDER), with a column per swept key.

    The columns hold only the ``swept`` keys' values (without ``swept``: the overrides whose values
    differ between trials), not the constant overrides repeated in every row; a key a trial did not
    set is empty.
    """
    records = {}
    for path in Path(sweep_dir).glob(f"*/{RESULT_FILE}"):
        records[path.parent.name] = json.loads(path.read_text(encoding="utf-8"))
    trial_overrides = {trial: overrides_of(record) for trial, record in records.items()}
    if swept is None:
        keys = {key for overrides in trial_overrides.values() for key in overrides}
        swept = {k for k in keys if len({str(o.get(k)) for o in trial_overrides.values()}) > 1}
    keys = sorted({k for overrides in trial_overrides.values() for k in overrides if k.lstrip("+~") in swept})
    names = short_names(keys)
    rows = []
    for trial, record in records.items():
        values = {names[key]: trial_overrides[trial].get(key, "") for key in keys}
        rows.append({column: record.get(column, "") for column in COLUMNS} | {"trial": trial} | values)

    def rank(row: dict[str, Any]) -> tuple[int, float, str]:
        bleu = row["val_bleu"]
        scored = isinstance(bleu, float) and math.isfinite(bleu) and row["status"] in STATUS_ORDER
        return (STATUS_ORDER[row["status"]], -bleu, "") if scored else (len(STATUS_ORDER), 0.0, row["trial"])

    return sorted(rows, key=rank)


def short_names(keys: list[str]) -> dict[str, str]:
    """Column names for swept keys: the last part of each (``lr`` for ``module.optimizer.lr``), with
    more parts where two keys would share a name."""
    parts = {key: key.lstrip("+~").split(".") for key in keys}
    depth = dict.fromkeys(keys, 1)
    while True:
        names = {key: ".".join(parts[key][-depth[key] :]) for key in keys}
        clashing = [k for k in keys if list(names.values()).count(names[k]) > 1 and depth[k] < len(parts[k])]
        if not clashing:
            return names
        for key in clashing:
            depth[key] += 1


def overrides_of(record: dict[str, Any]) -> dict[str, str]:
    """A trial's overrides as {key: value}, in command-line order."""
    overrides = record.get("overrides", [])
    overrides = overrides.split() if isinstance(overrides, str) else overrides  # older result files
    return dict(override.split("=", 1) for override in overrides if "=" in override)


def write_summary(sweep_dir: str | Path, swept: set[str] | None = None) -> list[dict[str, Any]]:
    """Write ``summary.csv``, atomically: workers of a sweep rewrite it as their trials end."""
    rows = collect_results(sweep_dir, swept)
    columns = list(COLUMNS) + [k for k in (rows[0] if rows else {}) if k not in COLUMNS]
    partial = Path(sweep_dir, f".{SUMMARY_FILE}.{os.getpid()}")
    with open(partial, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(partial, Path(sweep_dir, SUMMARY_FILE))
    return rows


WIDTH = 120  # the printed summary's lines; swept values that do not fit go to a table of their own


def format_summary(rows: list[dict[str, Any]]) -> str:
    """The summary as text tables of at most WIDTH characters: the trials' figures (tokens/s shows a
    trial that other work on the machine slowed down), then their swept values."""
    header = f"{'trial':>5}  {'status':<7}  {'val BLEU':>8}  {'test BLEU':>9}  {'minutes':>7}  {'steps':>6}"
    lines = [f"{header}  {'tokens/s':>8}  {'parameters':>11}"]

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
        lines.append(
            f"{row['trial']:>5}  {row['status']:<7}  {numbers}"
            + (f"  [{row['error']}]" if row["error"] else "")
        )
    swept = [k for k in (rows[0] if rows else {}) if k not in COLUMNS]
    widths = {k: max(len(k), *(len(str(row[k])) for row in rows)) for k in swept}
    while swept:  # tables of swept values, as many columns as fit in WIDTH
        block = [swept.pop(0)]
        while swept and 5 + sum(widths[k] + 2 for k in [*block, swept[0]]) <= WIDTH:
            block.append(swept.pop(0))
        lines += ["", f"{'trial':>5}" + "".join(f"  {k:>{widths[k]}}" for k in block)]
        lines += [f"{row['trial']:>5}" + "".join(f"  {row[k]!s:>{widths[k]}}" for k in block) for row in rows]
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
