"""The LightningModule's loss and learning-rate schedules, and training paths the smoke run does not
take: mixed source lengths in a batch, resuming exactly at an epoch boundary."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from seq2seq.data.encoded import EncodedSplit
from seq2seq.module import TranslationModule
from seq2seq.tokenization import PAD_ID
from seq2seq.training import train
from tests.fault_callbacks import read_records
from tests.test_distributed import RECORD, checkpoint_state
from tests.test_training import QUIET

TINY = {"embed_size": 8, "hidden_size": 16, "num_layers": 1, "dropout": 0.0}


def module(
    scheduler: dict, lr: float = 0.01, label_smoothing: float = 0.1, vocab: int = 12, **model
) -> TranslationModule:
    torch.manual_seed(0)
    return TranslationModule(
        TINY | model, vocab, vocab, {"lr": lr}, scheduler, label_smoothing=label_smoothing
    )


def pairs_batch():
    split = EncodedSplit(
        [[4, 5, 6], [7, 8], [9, 10, 11, 4, 5], [6]], [[5, 4], [8, 7, 6, 9], [4], [11, 10, 9]]
    )
    return split.collate([0, 1, 2, 3])


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_loss_and_gradients_match_torch_cross_entropy_with_label_smoothing(smoothing):
    model = module({"name": "constant"}, label_smoothing=smoothing, attention="bahdanau")
    batch = pairs_batch()
    losses, nll = model.smoothed_losses(batch)
    ours = losses.sum()
    params = [p for p in model.parameters() if p.requires_grad]
    ours_grads = torch.autograd.grad(ours, params)

    logits = model.model.logits(model.model(batch.src, batch.src_lengths, batch.tgt_in))  # (B, T, V)
    reference = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), batch.tgt_out.flatten(), ignore_index=PAD_ID, label_smoothing=smoothing,
        reduction="sum",
    )  # fmt: skip
    torch.testing.assert_close(ours, reference)
    for mine, theirs in zip(ours_grads, torch.autograd.grad(reference, params), strict=True):
        torch.testing.assert_close(mine, theirs)
    plain = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), batch.tgt_out.flatten(), ignore_index=PAD_ID, reduction="sum"
    )
    torch.testing.assert_close(nll.sum(), plain)
    assert nll.numel() == int((batch.tgt_out != PAD_ID).sum())


def learning_rates(model: TranslationModule, steps: int) -> list[float]:
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_inverse_sqrt_schedule_warms_up_linearly_then_decays_with_the_inverse_square_root():
    rates = learning_rates(module({"name": "inverse_sqrt", "warmup_steps": 4}, lr=0.01), 16)
    expected = [0.01 * (s / 4 if s < 4 else math.sqrt(4 / s)) for s in range(1, 17)]
    assert rates == pytest.approx(expected)
    assert rates[3] == pytest.approx(0.01) and rates[15] == pytest.approx(0.005)


def test_constant_schedule_warms_up_then_stays_flat():
    rates = learning_rates(module({"name": "constant", "warmup_steps": 4}, lr=0.01), 10)
    assert rates == pytest.approx([0.0025, 0.005, 0.0075] + [0.01] * 7)


def test_plateau_reduces_after_each_validation_without_a_better_bleu(compose_config, tmp_path):
    """Patience counts validations: with several validations inside the first epoch (and a learning
    rate too small to change the model's greedy output), every validation after the first lowers it."""
    cfg = compose_config(
        "experiment=smoke", "module.scheduler.name=plateau", "+module.scheduler.patience=0",
        "+module.scheduler.factor=0.5", "module.optimizer.lr=1e-7", "trainer.max_steps=12",
        "trainer.val_check_interval=4", "trainer.limit_val_batches=1", "decoding.beam=1", *QUIET,
    )  # fmt: skip
    train(cfg)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    # Three validations, two without a better BLEU: halved twice (stepping at epoch ends, as before,
    # would have halved it once at most).
    assert checkpoint["lr_schedulers"][0]["num_bad_epochs"] == 0
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(1e-7 * 0.5**2)


def test_batches_of_mixed_source_lengths_score_each_sentence_as_alone(compose_config):
    """data.equal_source_length=false: training batches mix source lengths, the encoder packs the
    padded sources, and each sentence's loss is the one it has alone."""
    cfg = compose_config("experiment=smoke", "data.equal_source_length=false")
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    batch = next(b for b in datamodule.train_dataloader() if len(set(b.src_lengths.tolist())) > 1)
    vocab = datamodule.tokenizer.tgt_vocab_size
    model = module({"name": "constant"}, vocab=vocab, bidirectional=True, bridge=True).eval()
    nll = model.token_nll(batch)
    real = batch.tgt_out != PAD_ID
    per_sentence = torch.zeros(real.size(0)).index_add_(0, real.nonzero()[:, 0], nll)
    split = datamodule.splits["train"]
    for row, index in enumerate(batch.indices.tolist()[:8]):
        alone = model.token_nll(split.collate([index]))
        torch.testing.assert_close(per_sentence[row], alone.sum(), rtol=1e-5, atol=1e-5)


def test_a_run_stopped_at_an_epoch_boundary_resumes_with_the_next_epoch(compose_config, tmp_path):
    small = ["experiment=smoke", "data.corpus.sizes.train=300", "decoding.beam=1", *QUIET]
    datamodule = instantiate(compose_config(*small).data)
    datamodule.setup("fit")
    epoch = len(datamodule.train_dataloader().batch_sampler)
    every = [f"trainer.val_check_interval={epoch}", f"{RECORD}"]

    def run(name: str, steps: int, *overrides: str) -> None:
        train(compose_config(
            *small, *every, f"+callbacks.record.path={tmp_path / name}.jsonl",
            f"paths.output_dir={tmp_path / name}", f"trainer.max_steps={steps}", *overrides,
        ))  # fmt: skip

    run("first", epoch)
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert checkpoint_state(last)[0] == epoch
    run("resumed", 2 * epoch, f"ckpt_path={last}")  # validation at the end of the second epoch
    run("reference", 2 * epoch)
    got = [(r["step"], r["epoch"], r["indices"]) for r in read_records(tmp_path / "resumed.jsonl")]
    expected = [(r["step"], r["epoch"], r["indices"]) for r in read_records(tmp_path / "reference.jsonl")]
    assert got == expected[epoch:] and {e for _, e, _ in got} == {1}
    resumed, reference = (
        checkpoint_state(tmp_path / n / "checkpoints" / "last.ckpt") for n in ("resumed", "reference")
    )
    assert resumed == pytest.approx(reference) and resumed[0] == 2 * epoch
