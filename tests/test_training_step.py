"""The training step: no waiting on the device between logging steps, the token-mean loss under gradient
accumulation; after training: the device the test split is decoded on, the best model of a resumed run."""

from __future__ import annotations

import contextlib
import csv
import json
import random
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader

from seq2seq.callbacks import ThroughputMonitor, TrainingFlops
from seq2seq.data.collate import batch_size, target_tokens
from seq2seq.data.encoded import EncodedSplit
from seq2seq.flops import measured_peak_flops, training_flops
from seq2seq.module import TranslationModule
from seq2seq.private_apis import should_update_logs
from seq2seq.training import train
from seq2seq.translator import Translator
from tests.test_training import QUIET

SMALL = "data.corpus.sizes={train:300,valid:20,test:20}"  # of the synthetic task

# What makes the host wait for the device when called on a tensor that lives there.
SYNCING = {"item", "tolist", "cpu", "__bool__", "nonzero", "__int__", "__float__", "__index__", "numpy"}
SYNCING |= {"masked_select", "equal", "allclose"}


class OnDevice(torch.Tensor):
    """Marks a tensor as living on the accelerator; everything computed from it inherits the mark.

    On a CPU-only machine this stands in for a GPU: a host-synchronising call on such a tensor is exactly
    one that would make the host wait for the GPU's queue.
    """

    calls: list[str] | None = None  # while counting: the synchronising calls seen

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if cls.calls is not None:
            name = getattr(func, "__name__", "")
            if name in SYNCING:
                cls.calls.append(name)
            elif name == "__getitem__" and any(is_bool_index(i) for i in flatten(args[1])):
                cls.calls.append("boolean-mask index")
        return super().__torch_function__(func, types, args, kwargs)


def flatten(index: Any) -> Iterator[Any]:
    yield from index if isinstance(index, tuple) else (index,)


def is_bool_index(index: Any) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype == torch.bool


@contextlib.contextmanager
def moved_tensors_marked(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Inside: ``Tensor.to`` (how a batch reaches the device) returns an :class:`OnDevice` tensor."""
    to = torch.Tensor.to
    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "to", lambda self, *a, **k: to(self, *a, **k).as_subclass(OnDevice))
        yield


def count_syncs_in_training_steps(monkeypatch, module: TranslationModule) -> list[tuple[int, list[str]]]:
    """Make ``module`` record the synchronising calls of each non-logging training step."""
    records: list[tuple[int, list[str]]] = []
    transfer, training_step = module.transfer_batch_to_device, module.training_step
    synchronize = torch.cuda.synchronize

    def counted_synchronize(*args: Any, **kwargs: Any) -> None:
        if OnDevice.calls is not None:
            OnDevice.calls.append("torch.cuda.synchronize")
        return synchronize(*args, **kwargs)

    def marked_transfer(batch, device, dataloader_idx):
        with moved_tensors_marked(monkeypatch):
            return transfer(batch, device, dataloader_idx)

    def counted_step(batch, batch_idx):
        if should_update_logs(module.trainer):
            return training_step(batch, batch_idx)
        OnDevice.calls = []
        try:
            return training_step(batch, batch_idx)
        finally:
            records.append((module.global_step, OnDevice.calls))
            OnDevice.calls = None

    monkeypatch.setattr(torch.cuda, "synchronize", counted_synchronize)
    monkeypatch.setattr(module, "transfer_batch_to_device", marked_transfer)
    monkeypatch.setattr(module, "training_step", counted_step)
    return records


@pytest.mark.parametrize(
    "overrides",
    [
        [],  # equal source lengths: no packing
        # packing, reversed sources, accumulation, skipping non-finite steps
        [
            "data.equal_source_length=false", "model.reverse_source=true", "module.nonfinite_loss=skip",
            "trainer.accumulate_grad_batches=2",
        ],
    ],
)  # fmt: skip
def test_training_steps_never_wait_for_the_device_between_logging_steps(
    compose_config, tmp_path, monkeypatch, overrides
):
    cfg = compose_config("experiment=smoke", SMALL, *overrides)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    module = instantiate(
        cfg.module, src_vocab_size=datamodule.tokenizer.src_vocab_size,
        tgt_vocab_size=datamodule.tokenizer.tgt_vocab_size, _convert_="all",
    )  # fmt: skip
    records = count_syncs_in_training_steps(monkeypatch, module)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, log_every_n_steps=4, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, gradient_clip_val=1.0,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 4
    assert len(records) == 3 * cfg.trainer.accumulate_grad_batches  # step 3 is a logging step
    assert [calls for _, calls in records if calls] == []
    # The counting sees what it must: the same calls on the batch's device tensors are counted.
    OnDevice.calls = []
    with moved_tensors_marked(monkeypatch):
        ids = torch.tensor([1, 2]).to("cpu")
    bool(ids.sum()), ids.tolist(), ids[ids > 1], ids.cpu()
    assert OnDevice.calls == ["__bool__", "tolist", "boolean-mask index", "cpu"]
    OnDevice.calls = None


def random_split(seed: int = 0) -> EncodedSplit:
    """Eight pairs of random ids of the tiny vocabulary, of very different lengths."""
    rng = random.Random(seed)
    lengths = [2, 3, 9, 9, 8, 9, 4, 7]
    return EncodedSplit(
        [[rng.randint(4, 11) for _ in range(n)] for n in lengths],
        [[rng.randint(4, 11) for _ in range(n + rng.randint(-1, 3))] for n in lengths],
    )


def fit_tiny_module(
    batches: list, optimizer: dict[str, float] | None = None, **trainer_options: Any
) -> tuple[TranslationModule, L.Trainer]:
    """A fresh tiny module (seed 0) trained on ``batches`` (in order) with these AdamW settings (lr 1e-3
    by default) and Trainer options."""
    torch.manual_seed(0)
    module = TranslationModule(
        model={"embed_size": 8, "hidden_size": 16, "dropout": 0.0, "bidirectional": True, "bridge": True},
        src_vocab_size=12, tgt_vocab_size=12, optimizer=optimizer or {"lr": 1e-3},
        scheduler={"name": "constant"},
    )  # fmt: skip
    options = {"logger": False} | trainer_options
    trainer = L.Trainer(
        accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        **options,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, collate_fn=lambda b: b))
    return module, trainer


class GrabGradients(L.Callback):
    """Keeps the gradients the optimizer step after batch ``batch_idx`` used."""

    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx
        self.grads: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch_idx:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters()}


class ScaledFp32(MixedPrecision):
    """16-mixed's grad scaler without autocast: the scaler path of trainer=gpu, on a CPU (which has no
    fp16 LSTM)."""

    def __init__(self) -> None:
        super().__init__("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))

    def autocast_context_manager(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def test_the_grad_scaler_path_clips_unscaled_gradients_with_fused_adamw():
    """Lightning refuses to clip for fused AdamW under 16-mixed; the module unscales, then clips: the
    weights after the steps are those of the same run without a scaler."""
    batches = [random_split(seed).collate(list(range(8))) for seed in range(3)]
    # An epsilon far above the gradients makes AdamW's update about lr x gradient, so the weights show
    # the size of the clipped gradients (with the usual 1e-8, AdamW would undo any common scale).
    adamw = {"lr": 1.0, "eps": 1.0}
    clipped = {"optimizer": adamw, "gradient_clip_val": 0.05, "max_steps": 3}
    scaled, trainer = fit_tiny_module(batches, plugins=[ScaledFp32()], **clipped)
    assert trainer.global_step == 3 and trainer.precision_plugin.scaler.get_scale() == 2.0**10
    assert all(state["step"] == 3 for state in trainer.optimizers[0].state.values())
    reference, _ = fit_tiny_module(batches, **clipped)
    for (name, weights), expected in zip(scaled.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-7, msg=name)
    # The clipping bites: without it, the weights end elsewhere.
    unclipped, _ = fit_tiny_module(batches, optimizer=adamw, max_steps=3)
    flat = torch.nn.utils.parameters_to_vector
    assert torch.dist(flat(reference.parameters()), flat(unclipped.parameters())) > 0.1


def test_accumulated_gradients_are_those_of_one_batch_holding_the_same_pairs():
    split = random_split()
    # Micro-batches with very different token counts: a mean of their means is not the token mean.
    micro = [[0], [1, 6], [2, 3, 4, 5, 7]]
    accumulated, whole = GrabGradients(batch_idx=2), GrabGradients(batch_idx=0)
    batches = [split.collate(m) for m in micro]
    fit_tiny_module(batches, max_steps=1, accumulate_grad_batches=3, callbacks=[accumulated])
    fit_tiny_module([split.collate([i for m in micro for i in m])], max_steps=1, callbacks=[whole])
    assert accumulated.grads.keys() == whole.grads.keys()
    for name, grad in whole.grads.items():
        torch.testing.assert_close(accumulated.grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


class ClaimDeviceAfterFit(L.Callback):
    """After training, the trainer says it trained on ``cuda:3``: where the test split must be decoded."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy._root_device = torch.device("cuda", 3)


def test_test_split_is_decoded_on_the_training_device(compose_config, monkeypatch):
    devices = []

    def from_checkpoint(path, device="cpu", precision="fp32"):
        devices.append(torch.device(device))
        return Translator.from_checkpoints([path], precision=precision)  # on the CPU, which this machine has

    monkeypatch.setattr(Translator, "from_checkpoint", from_checkpoint)
    cfg = compose_config(
        "experiment=smoke", SMALL, "trainer.max_steps=4", "trainer.val_check_interval=4", "decoding.beam=1",
        "+callbacks.claim._target_=tests.test_training_step.ClaimDeviceAfterFit", *QUIET,
    )  # fmt: skip
    train(cfg)
    assert devices == [torch.device("cuda", 3)]


def test_a_resumed_run_scores_the_best_model_of_the_whole_run(compose_config, tmp_path):
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    quick = ["experiment=smoke", SMALL, "trainer.val_check_interval=10", "decoding.beam=1", *QUIET]
    train(compose_config(*quick, "trainer.max_steps=20", f"paths.output_dir={first}"))
    (best,) = (first / "checkpoints").glob("best-*.ckpt")
    best_score = json.loads((first / "result.json").read_text())["val_bleu"]

    # Five more steps in a new run directory, without a validation: the first part's best stays best.
    last = first / "checkpoints" / "last.ckpt"
    bleu = train(
        compose_config(*quick, "trainer.max_steps=25", f"ckpt_path={last}", f"paths.output_dir={resumed}")
    )
    assert bleu == pytest.approx(best_score)
    result = json.loads((resumed / "result.json").read_text())
    assert Path(result["checkpoint"]) == resumed / "checkpoints" / best.name and best.is_file()
    assert (resumed / "test.hyp").is_file()


def test_throughput_is_timed_on_logging_steps_only(tmp_path):
    """Every batch is counted, the clock read (after a GPU synchronisation) only every 3 steps."""
    monitor = ThroughputMonitor(batch_size_fn=batch_size, length_fn=target_tokens, window_size=2)
    batches = [random_split(seed).collate(list(range(8))) for seed in range(7)]
    logger = CSVLogger(tmp_path, name="", version="")
    fit_tiny_module(batches, max_steps=7, log_every_n_steps=3, callbacks=[monitor], logger=logger)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    timed = [row for row in rows if row.get("train/device/items_per_sec")]
    assert [int(row["step"]) for row in timed] == [5]  # window of 2 timed steps: 2 and 5 (0-based)
    assert int(timed[0]["train/lengths"]) == sum(b.num_target_tokens for b in batches[:6])


@pytest.mark.parametrize("every", [1, 10])
def test_logged_flops_per_second_are_tokens_per_second_times_flops_per_token(tmp_path, every):
    """The FLOP/s the monitor logs, whatever the logging interval, against the count of seq2seq/flops.py
    times the target tokens/s it logs; MFU against the peak measured on this host."""
    batch = random_split(0).collate(list(range(8)))  # the same batch each step: FLOPs per token fixed
    monitor = ThroughputMonitor(batch_size_fn=batch_size, length_fn=target_tokens, window_size=3)
    logger = CSVLogger(tmp_path, name="", version="")
    callbacks = [monitor, TrainingFlops()]
    module, _ = fit_tiny_module(
        [batch] * 30, max_steps=30, log_every_n_steps=every, callbacks=callbacks, logger=logger
    )
    per_token = training_flops(module.model, batch) / batch.num_target_tokens
    rows = [
        r for r in csv.DictReader((tmp_path / "metrics.csv").open()) if r.get("train/device/flops_per_sec")
    ]
    assert len(rows) == 30 // every - 2  # a window of 3 timed steps
    for row in rows:
        flops_per_second = float(row["train/device/flops_per_sec"])
        assert flops_per_second == pytest.approx(
            float(row["train/device/items_per_sec"]) * per_token, rel=0.05
        )
        peak = measured_peak_flops("cpu", torch.float32)  # measured once per process
        assert float(row["train/device/mfu"]) == pytest.approx(flops_per_second / peak)


@pytest.mark.parametrize("trainer", ["gpu", "ddp"])
def test_gpu_trainers_compose_with_gpu_settings(compose_config, trainer):
    cfg = compose_config(f"trainer={trainer}", "trainer.devices=4", fp32=False)
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "16-mixed"
    assert cfg.trainer.strategy == ("ddp" if trainer == "ddp" else "auto") and cfg.trainer.devices == 4
    assert cfg.float32_matmul_precision == "high" and cfg.data.batch_tokens == 12000
    assert instantiate(cfg.data).pin_memory and cfg.data.num_workers == 4
    last = instantiate(cfg.callbacks.last_checkpoint)
    assert last._train_time_interval == timedelta(minutes=30) and last._every_n_train_steps == 0


def test_without_test_scoring_the_best_checkpoint_still_gets_its_alpha(compose_config, tmp_path):
    """A sweep trial (evaluate.test=false) hands on a best checkpoint whose alpha=auto was tuned."""
    cfg = compose_config(
        "experiment=smoke",
        SMALL,
        "trainer.max_steps=40",
        "trainer.val_check_interval=20",  # 2 validations: evaluate.min_validations lets it tune
        "decoding.beam=2",
        "decoding.alpha=auto",
        "evaluate.test=false",
        *QUIET,
    )
    train(cfg)
    (best,) = (tmp_path / "run" / "checkpoints").glob("best-*.ckpt")
    checkpoint = torch.load(best, map_location="cpu", weights_only=False)
    assert isinstance(checkpoint["hyper_parameters"]["decoding"]["alpha"], float)
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert (
        result["test_bleu"] is None and result["alpha"] == checkpoint["hyper_parameters"]["decoding"]["alpha"]
    )
    assert not (tmp_path / "run" / "test.hyp").exists()


def test_measuring_the_peak_leaves_the_random_stream_alone():
    """The throughput monitor measures the peak at the start of training: the dropout masks and
    everything else drawn after it must be those of a run that did not measure."""
    measured_peak_flops.cache_clear()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    assert measured_peak_flops("cpu", torch.float32) > 0
    assert torch.equal(torch.rand(3), expected)
