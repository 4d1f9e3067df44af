"""Precision per host: the CPU bf16 probe, its fallback, and auto precision in training and decoding.

These hold on every host: where the CPU runs bf16 the probe's answer is bf16, elsewhere fp32; the
fallback is exercised by making the probe's bf16 step fail as it fails on AVX2-only CPUs.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch

from seq2seq import precision as precision_module
from seq2seq.precision import probe_cpu_bf16, resolve_decoding_precision, resolve_trainer_precision
from seq2seq.training import train
from seq2seq.translator import Translator
from tests.conftest import tiny_model

ONEDNN_AVX2_ERROR = "could not create a primitive descriptor for the LSTM forward propagation primitive"


@pytest.fixture
def fresh_probe():
    """The probe runs again in the test, and the real answer comes back afterwards."""
    probe_cpu_bf16.cache_clear()
    yield
    probe_cpu_bf16.cache_clear()


@pytest.fixture
def without_bf16(monkeypatch, fresh_probe):
    """This host as an AVX2-only one: oneDNN fails to build the bf16 LSTM primitive."""

    def fail() -> None:
        raise RuntimeError(ONEDNN_AVX2_ERROR)

    monkeypatch.setattr(precision_module, "bf16_lstm_step", fail)
    monkeypatch.setattr(precision_module, "has_native_bf16", lambda: True)


def test_the_probe_answers_a_valid_precision_and_says_why(caplog, fresh_probe):
    probe = probe_cpu_bf16()
    with caplog.at_level(logging.INFO, logger="seq2seq.precision"):
        chosen = resolve_trainer_precision("auto", "cpu")
    assert chosen == ("bf16-mixed" if probe.usable else "32-true")
    assert f"trainer.precision=auto: {chosen}, because {probe}" in caplog.text
    assert resolve_decoding_precision("auto", "cpu") == ("bf16" if probe.usable else "fp32")
    assert probe_cpu_bf16() is probe  # once per process


@pytest.mark.parametrize("without_grad", [torch.no_grad, torch.inference_mode])
def test_the_probe_leaves_random_state_and_grad_mode_alone(monkeypatch, fresh_probe, without_grad):
    # The probe's own step with autocast off (fp32), which runs on every host, AVX2-only ones too: an
    # error can then only come from the probe itself, such as a backward pass without gradients.
    autocast = torch.autocast
    monkeypatch.setattr(
        torch, "autocast", lambda device_type, **options: autocast(device_type, enabled=False)
    )
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with without_grad():
        probe = probe_cpu_bf16()
        assert not torch.is_grad_enabled()  # the caller's mode is back
    assert probe.error is None  # its backward pass ran, under the caller's no_grad or inference_mode
    assert torch.equal(torch.rand(3), expected)


def test_explicit_precision_wins_and_gpus_stay_fp32():
    assert resolve_trainer_precision("32-true", "cpu") == "32-true"
    assert resolve_trainer_precision("64-true", "cpu") == "64-true"
    assert resolve_trainer_precision("auto", "gpu") == "32-true"
    assert resolve_decoding_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ValueError, match=r"evaluate\.precision must be one of"):
        resolve_decoding_precision("bf16-mixed", "cpu", "evaluate.precision")


def test_a_host_without_bf16_falls_back_with_a_log_line(caplog, without_bf16):
    with caplog.at_level(logging.INFO, logger="seq2seq.precision"):
        assert resolve_trainer_precision("auto", "cpu") == "32-true"
        assert resolve_decoding_precision("auto", "cpu") == "fp32"
    assert "trainer.precision=auto: 32-true, because a bf16 LSTM fails under CPU autocast" in caplog.text
    assert ONEDNN_AVX2_ERROR in caplog.text and "precision=auto: fp32" in caplog.text
    # Asked for explicitly, bf16 fails before training or decoding starts, naming the option.
    with pytest.raises(ValueError, match=r"trainer.precision=bf16-mixed cannot run on this CPU.*32-true"):
        resolve_trainer_precision("bf16-mixed", "cpu")
    # A GPU config's fp16 on the CPU (Lightning would switch it to bf16-mixed unasked) is chosen as auto.
    with caplog.at_level(logging.INFO, logger="seq2seq.precision"):
        assert resolve_trainer_precision("16-mixed", "cpu") == "32-true"
    assert "trainer.precision=16-mixed: there is no fp16 autocast on CPU" in caplog.text
    assert resolve_trainer_precision("16-mixed", "gpu") == "16-mixed"
    with pytest.raises(ValueError, match="precision=bf16 cannot run on this CPU"):
        Translator(tiny_model(), None, 16, precision="bf16")


def test_emulated_bf16_is_not_picked(caplog, monkeypatch, fresh_probe):
    # A host where the bf16 step runs (on an AVX2-only host it fails, which is the case above) but the
    # CPU has no bf16 instructions.
    monkeypatch.setattr(precision_module, "bf16_lstm_step", lambda: None)
    monkeypatch.setattr(precision_module, "has_native_bf16", lambda: False)
    with caplog.at_level(logging.INFO, logger="seq2seq.precision"):
        assert resolve_trainer_precision("auto", "cpu") == "32-true"
    assert "no native bf16" in caplog.text


@pytest.mark.slow
def test_a_run_with_auto_precision_trains_and_scores(compose_config, tmp_path, caplog, capsys):
    probe = probe_cpu_bf16()
    cfg = compose_config(
        "experiment=smoke", "trainer.max_steps=30", "trainer.precision=auto", "evaluate.precision=auto",
        "trainer.enable_progress_bar=false",
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="seq2seq.precision"):
        best_bleu = train(cfg)
    chosen = "bf16-mixed" if probe.usable else "32-true"
    assert f"trainer.precision=auto: {chosen}" in caplog.text
    assert best_bleu > 0
    stdout = capsys.readouterr().out
    assert (
        re.search(rf"beam 2, alpha [\d.]+, {'bf16' if probe.usable else 'fp32'}", stdout)
        and "BLEU = " in stdout
    )
    assert (tmp_path / "run" / "test.hyp").read_text().count("\n") == 200


@pytest.mark.slow
def test_a_run_on_a_host_without_bf16_trains_in_fp32(compose_config, tmp_path, caplog, without_bf16):
    auto = ["trainer.precision=auto", "evaluate.precision=auto"]  # what the tests pin, back to auto
    cfg = compose_config(
        "experiment=smoke", *auto, "trainer.max_steps=30", "trainer.enable_progress_bar=false"
    )
    with caplog.at_level(logging.INFO, logger="seq2seq.precision"):
        train(cfg)
    assert "trainer.precision=auto: 32-true, because a bf16 LSTM fails" in caplog.text
    assert "evaluate.precision=auto: fp32" in caplog.text
    assert (tmp_path / "run" / "test.hyp").is_file()
