"""Hydra multirun sweeps on the smoke experiment: a grid, an Optuna search, and a failing trial."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from .test_training import QUIET, run_script

pytestmark = pytest.mark.slow


def sweep(tmp_path: Path, *overrides: str):
    result = run_script(
        "train.py", "--multirun", "experiment=smoke", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"paths.cache_dir={tmp_path / 'cache'}", *QUIET, *overrides,
    )  # fmt: skip
    summary = tmp_path / "sweep" / "summary.csv"
    rows = list(csv.DictReader(summary.open())) if summary.exists() else []
    return result, rows


def test_grid_sweep_writes_a_summary_best_first(tmp_path):
    result, rows = sweep(tmp_path, "model.dropout=0.0,0.2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(rows) == 2 and {r["status"] for r in rows} == {"ok"}
    # Only the swept value, not the constant overrides of every trial (experiment=smoke, paths, ...).
    assert sorted(r["overrides"] for r in rows) == ["model.dropout=0.0", "model.dropout=0.2"]
    bleus = [float(r["val_bleu"]) for r in rows]
    assert bleus == sorted(bleus, reverse=True)
    for row in rows:
        assert (
            Path(row["checkpoint"]).is_file()
            and int(row["parameters"]) > 0
            and float(row["train_minutes"]) > 0
            and 0 <= float(row["test_bleu"]) <= 100
            and int(row["steps"]) == 60  # experiment=smoke: max_steps
            and float(row["tokens_per_second"]) > 0
        )
    assert "Sweep summary" in result.stdout and "tokens/s" in result.stdout


def test_a_failing_trial_is_recorded_and_the_others_complete(tmp_path):
    result, rows = sweep(tmp_path, "model.hidden_size=-1,128")
    assert len(rows) == 2
    ok, failed = rows
    assert ok["status"] == "ok" and ok["overrides"] == "model.hidden_size=128" and float(ok["val_bleu"]) >= 0
    assert failed["status"] == "failed" and failed["overrides"] == "model.hidden_size=-1"
    assert "model.hidden_size must be positive" in failed["error"]
    # Hydra's grid sweeper reports the failure once every trial has run: a user's mistake, in one line.
    assert result.returncode == 2 and "error: " in result.stderr and "Traceback" not in result.stderr


def test_recipe_search_two_trials_in_sqlite_decides_without_test_scores(tmp_path):
    optuna = pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    result, rows = sweep(
        tmp_path, "hparams_search=bible_recipe", "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.storage={storage}", "trainer.max_steps=30", "trainer.val_check_interval=30",
        # the toy corpus's own subwords: it has too few pieces for the searched vocabularies
        "data.subword.vocab_size=32", "data.subword.model_type=word",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(rows) == 2 and {r["status"] for r in rows} == {"ok"}
    searched = ("model.bidirectional", "model.reverse_source", "model.hidden_size", "module.optimizer.lr")
    assert all(all(f"{key}=" in r["overrides"] for key in searched) for r in rows)
    assert all("trainer.max_steps" not in r["overrides"] for r in rows)  # constant: not shown
    # evaluate.test=false: no test decoding at all, so the choice cannot see test scores.
    assert all(r["test_bleu"] == "" for r in rows)
    assert not list((tmp_path / "sweep").glob("*/test.hyp"))
    study = optuna.load_study(study_name="bible_recipe", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert max(t.value for t in study.trials) == pytest.approx(float(rows[0]["val_bleu"]))
