"""Validation leaves training's random stream alone: how often a run validates does not change what it
trains on, step for step."""

from __future__ import annotations

import csv

from seq2seq.training import train
from tests.test_schedules import QUICK


def train_losses(compose_config, tmp_path, name: str, *overrides: str) -> dict[int, str]:
    """Train; the logged training loss of every step, as written in metrics.csv."""
    train(compose_config(
        *QUICK, "model.dropout=0.3", "trainer.max_steps=30", "trainer.log_every_n_steps=1",
        f"paths.output_dir={tmp_path / name}", *overrides,
    ))  # fmt: skip
    rows = csv.DictReader((tmp_path / name / "logs" / "metrics.csv").open())
    return {int(row["step"]): row["train_loss"] for row in rows if row.get("train_loss")}


def test_training_losses_do_not_depend_on_how_often_validation_runs(compose_config, tmp_path):
    """Dropout draws from the global random stream every step: a validation that drew from it too (the
    loader's base seed, a decoding's sampling) would shift every later step's dropout masks."""
    often = train_losses(compose_config, tmp_path, "often", "trainer.val_check_interval=5")
    rarely = train_losses(compose_config, tmp_path, "rarely", "trainer.val_check_interval=15")
    assert len(often) == 30 and often == rarely
