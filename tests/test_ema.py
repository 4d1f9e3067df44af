"""The exponential moving average of the weights (module.ema_decay): its value after a few real training
steps, what the best and last checkpoints hold, and a resumed run continuing it."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from seq2seq.module import TranslationModule
from seq2seq.training import train
from tests.test_schedules import QUICK


class RecordParameters(L.Callback):
    """The parameters after each training batch (fp32 copies)."""

    def __init__(self) -> None:
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        self.snapshots.append({n: p.detach().float().clone() for n, p in pl_module.named_parameters()})


def test_the_average_after_a_few_steps_is_the_hand_computed_one(compose_config):
    cfg = compose_config(*QUICK)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    vocab = datamodule.tokenizer.src_vocab_size
    torch.manual_seed(0)
    module = TranslationModule(
        dict(cfg.model), vocab, vocab, {"lr": 0.01}, {"name": "constant", "warmup_steps": 1}, ema_decay=0.2
    )
    module.tokenizer = datamodule.tokenizer
    record = RecordParameters()
    trainer = L.Trainer(
        max_steps=4, callbacks=[record], accelerator="cpu", precision="32-true", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)

    weights = record.snapshots
    assert len(weights) == 4
    expected = dict(weights[0])  # the first update copies the weights
    for n, decay in zip((1, 2, 3), (2 / 11, 0.2, 0.2), strict=True):  # min(0.2, (1 + n) / (10 + n))
        expected = {k: decay * v + (1 - decay) * weights[n][k] for k, v in expected.items()}
    average = module.weight_average.average
    assert module.weight_average.updates == 4 and average.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(average[name], value)
    # Training went on with the raw weights.
    raw = dict(module.named_parameters())
    assert all(torch.equal(raw[name].detach(), weights[3][name]) for name in raw)
    assert not any(torch.equal(average[name], weights[3][name]) for name in average)


def test_best_checkpoint_holds_the_average_last_holds_raw_weights_and_a_resume_continues_it(
    compose_config, tmp_path
):
    options = [*QUICK, "module.ema_decay=0.9", "trainer.max_steps=20"]
    options += ["trainer.val_check_interval=10", "callbacks.model_checkpoint.save_top_k=-1"]
    # Full checkpoints during training, to resume from (one written after fit, by a max_steps stop in
    # mid-epoch, would resume into the next epoch's batches).
    every_10 = [
        "+callbacks.every_10._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        f"+callbacks.every_10.dirpath={tmp_path / 'every_10'}", "+callbacks.every_10.filename='step{step}'",
        "+callbacks.every_10.auto_insert_metric_name=false",
        "+callbacks.every_10.every_n_train_steps=10", "+callbacks.every_10.save_top_k=-1",
    ]  # fmt: skip
    train(compose_config(*options, *every_10, f"paths.output_dir={tmp_path / 'whole'}"))
    best_files = sorted((tmp_path / "whole" / "checkpoints").glob("best-step20-*.ckpt"))
    best = torch.load(best_files[0], weights_only=False)
    last = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=False)
    state = last["callbacks"]["WeightAverage"]
    assert state["updates"] == 20
    for name, average in state["average"].items():
        torch.testing.assert_close(best["state_dict"][name], average)  # best: the average
        assert not torch.equal(last["state_dict"][name], average)  # last: the raw weights
    assert "optimizer_states" in last and "optimizer_states" not in best

    step_10 = tmp_path / "every_10" / "step10.ckpt"
    assert torch.load(step_10, weights_only=False)["callbacks"]["WeightAverage"]["updates"] == 10
    train(compose_config(*options, f"ckpt_path={step_10}", f"paths.output_dir={tmp_path / 'resumed'}"))
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["callbacks"]["WeightAverage"]["updates"] == 20
    for name, average in state["average"].items():
        torch.testing.assert_close(resumed["callbacks"]["WeightAverage"]["average"][name], average)
        torch.testing.assert_close(resumed["state_dict"][name], last["state_dict"][name])


def test_ema_decay_must_be_in_the_open_unit_interval():
    with pytest.raises(ValueError, match=r"module.ema_decay must be in \(0, 1\) or null, got 1.0"):
        TranslationModule(
            {"embed_size": 8, "hidden_size": 16}, 12, 12, {"lr": 0.01}, {"name": "constant"}, ema_decay=1.0
        )


def test_validation_scores_the_average_not_the_raw_weights(compose_config, tmp_path):
    """The logged validation loss and BLEU are those of the averaged weights (held by the best
    checkpoint), which differ from those of the raw weights (last.ckpt) that training left."""
    cfg = compose_config(
        *QUICK, "module.ema_decay=0.9", "trainer.max_steps=12", "trainer.val_check_interval=12",
        "trainer.precision=32-true",
    )  # fmt: skip
    train(cfg)
    (logged,) = [
        r for r in csv.DictReader((tmp_path / "run" / "logs" / "metrics.csv").open()) if r["val_loss"]
    ]
    checkpoints = tmp_path / "run" / "checkpoints"
    (best,) = checkpoints.glob("best-step12-*.ckpt")
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")

    def scores(path: Path) -> dict[str, float]:
        """Validation's scores of a checkpoint's weights, as they are (no averaging outside fit)."""
        checkpoint = torch.load(path, weights_only=False)
        module = TranslationModule(**checkpoint["hyper_parameters"])
        module.load_state_dict(checkpoint["state_dict"])
        module.tokenizer = datamodule.tokenizer
        trainer = L.Trainer(
            accelerator="cpu", precision="32-true", logger=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=1, use_distributed_sampler=False,
        )  # fmt: skip
        (metrics,) = trainer.validate(module, datamodule=datamodule, verbose=False)
        return metrics

    average, raw = scores(best), scores(checkpoints / "last.ckpt")
    tolerance = 1e-4
    assert abs(average["val_loss"] - raw["val_loss"]) > 100 * tolerance  # 0.06 here: told apart
    loss = float(logged["val_loss"])
    assert abs(loss - average["val_loss"]) < tolerance, (
        f"logged val_loss {loss}: the averaged weights score {average['val_loss']}, the raw {raw['val_loss']}"
    )
    assert float(logged["val_bleu"]) == pytest.approx(average["val_bleu"], abs=tolerance)
