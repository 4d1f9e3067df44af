"""Bad input, faults and mistakes: each fails clearly, naming what is at fault, and loses nothing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from seq2seq.data import TranslationDataModule, load_synthetic
from seq2seq.search import DecodingSettings
from seq2seq.tokenization import SubwordSettings, train_or_load
from seq2seq.training import train
from seq2seq.translator import Translator, translate_file
from tests.conftest import tiny_model
from tests.test_training import QUIET, run_script

NAN_AT_BATCH_3 = ["+callbacks.nan._target_=tests.fault_callbacks.NanAtBatch", "+callbacks.nan.batch=3"]


@pytest.fixture(scope="module")
def random_translator(tmp_path_factory) -> Translator:
    """An untrained model with a real sentencepiece model: what it outputs does not matter here."""
    corpus = load_synthetic("copy", 8, 2, 6, {"train": 300, "valid": 5, "test": 5}, seed=1)
    tokenizer = train_or_load(
        corpus.train.src,
        corpus.train.tgt,
        SubwordSettings(vocab_size=12, model_type="word"),
        tmp_path_factory.mktemp("spm"),
    )
    return Translator(tiny_model(), tokenizer, max_src_len=16)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_bytes("".join(line + "\n" for line in lines).encode("utf-8"))
    return path


any_char = st.characters(blacklist_characters="\n", blacklist_categories=("Cs",))  # Cs: lone surrogates
tricky = st.sampled_from(["🙂", "👍🏽", "e\u0301", "\u0300", "\u200d", "\x00", "\x1b[31m", "\t", "\r"])
a_line = st.one_of(
    st.text(any_char, max_size=40),
    st.lists(tricky).map("".join),
    st.sampled_from(["", "   "]),
    # very long lines: a random piece repeated (a random 3,000 characters is more than hypothesis draws)
    st.builds(str.__mul__, st.text(any_char, min_size=1, max_size=12), st.integers(300, 600)),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(a_line, max_size=12))
def test_translate_keeps_every_line_in_order(random_translator, tmp_path, lines):
    source = write_lines(tmp_path / "in.txt", lines)
    output = tmp_path / "out.txt"
    translate_file(random_translator, str(source), str(output), DecodingSettings(beam=2), progress=False)
    translated = output.read_bytes().decode("utf-8").split("\n")
    assert translated.pop() == ""  # every line ends with a newline, the last one too
    assert len(translated) == len(lines)
    # In order: each line is what translating it alone gives.
    assert translated == [random_translator.translate([line], beam=2)[0] for line in lines]


def test_interrupted_translation_leaves_no_output_file(random_translator, tmp_path):
    source = tmp_path / "in.txt"
    source.write_bytes(b"w1 w2\nw3\nbroken \xff\nw4\n")
    output = tmp_path / "out.txt"
    with pytest.raises(ValueError, match=r"in\.txt, line 3: invalid UTF-8"):
        translate_file(random_translator, str(source), str(output), DecodingSettings(beam=1), chunk_lines=1)
    assert list(tmp_path.iterdir()) == [source]  # neither out.txt nor its temporary file


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss_stops_naming_the_step_or_skips_it(compose_config, tmp_path, caplog, policy):
    cfg = compose_config(
        "experiment=smoke", "trainer.max_steps=10", "trainer.val_check_interval=10", "decoding.beam=1",
        f"module.nonfinite_loss={policy}", *NAN_AT_BATCH_3, *QUIET,
    )  # fmt: skip
    if policy == "stop":
        with pytest.raises(FloatingPointError, match=r"Non-finite training loss \(nan\) at step 3 "):
            train(cfg)
        return
    caplog.set_level(logging.WARNING, logger="seq2seq.module")
    train(cfg)
    assert "Skipped a step with a non-finite training loss (nan) at step 3" in caplog.text
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert all(weights.isfinite().all() for weights in checkpoint["state_dict"].values())
    metrics = (tmp_path / "run" / "logs" / "metrics.csv").read_text()
    assert "train_skipped_steps" in metrics.splitlines()[0]


@pytest.mark.parametrize(
    ("override", "error", "message"),
    [
        ("model=huge", MissingConfigException, "Could not find 'model/huge'"),
        ("trainer.no_such_key=1", ConfigCompositionException, "Could not override 'trainer.no_such_key'"),
    ],
)
def test_config_mistakes_fail_in_composition(compose_config, override, error, message):
    with pytest.raises(error, match=message):
        compose_config(override)


def test_unknown_option_fails_before_any_data_is_read(tmp_path):
    run = tmp_path / "run"
    result = run_script("train.py", "model=huge", f"paths.cache_dir={tmp_path}", f"hydra.run.dir={run}")
    assert result.returncode != 0 and "Could not find 'model/huge'" in result.stderr
    assert not run.exists() and not (tmp_path / "sentencepiece").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["decoding.beam=0"], "decoding.beam must be an integer of at least 1, got 0"),
        (["decoding.max_len_a=-1"], r"decoding.max_len_a must be a number >= 0, got -1"),
        (["decoding.alpha=-0.5"], r"decoding.alpha must be a number >= 0 or 'auto', got -0.5"),
        (["decoding.min_len=12"], r"decoding.min_len must be an integer between 0 and max_len_b=10"),
        (["evaluate.bleu_tokenize=klingon"], r"evaluate.bleu_tokenize must be null .* got 'klingon'"),
        (["evaluate.alpha_grid=[]"], r"evaluate.alpha_grid must be a non-empty list of numbers >= 0"),
        (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path: Checkpoint not found: /nonexistent/last.ckpt"),
    ],
)
def test_impossible_values_fail_before_any_data_is_read(compose_config, tmp_path, overrides, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train(compose_config("experiment=smoke", *overrides))
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("kind", ["truncated", "foreign"])
def test_truncated_or_foreign_checkpoint_fails_clearly(compose_config, tmp_path, kind):
    path = tmp_path / f"{kind}.ckpt"
    torch.save({"weights": torch.zeros(1000), "note": "not ours"}, path)
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ValueError, match=f"Cannot load checkpoint {path}"):
        Translator.from_checkpoint(path)
    expected = (
        "truncated or not a checkpoint" if kind == "truncated" else "is not a checkpoint of this toolkit"
    )
    with pytest.raises(ValueError, match=f"ckpt_path: .*{kind}.ckpt.*{expected}"):
        train(compose_config("experiment=smoke", f"ckpt_path={path}"))


EXPERIMENTS = sorted(path.stem for path in (Path(__file__).parents[1] / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_builds_its_module_data_and_trainer(compose_config, experiment):
    """Each experiment's data, module (its model shrunk 32 times, in the same ratio) and trainer are
    built from its config; then the module and trainer run a training and a validation step on the
    synthetic task (the real corpus would take minutes to read and tokenize)."""
    cfg = compose_config(f"experiment={experiment}")
    datamodule = instantiate(cfg.data)
    assert isinstance(datamodule, TranslationDataModule) and callable(datamodule.load_corpus)
    toy = compose_config(f"experiment={experiment}", "data=toy", "+trainer.fast_dev_run=1", *QUIET)
    assert toy.model == cfg.model and toy.trainer.max_time == cfg.trainer.max_time
    toy_data = instantiate(toy.data)
    toy_data.setup("fit")
    shrunk = {k: cfg.model[k] // 32 for k in ("embed_size", "hidden_size")}
    module = instantiate(
        toy.module,
        model={**OmegaConf.to_container(cfg.model), **shrunk},
        src_vocab_size=toy_data.tokenizer.src_vocab_size,
        tgt_vocab_size=toy_data.tokenizer.tgt_vocab_size,
        decoding=OmegaConf.to_container(toy.decoding),
        _convert_="all",
    )
    module.tokenizer = toy_data.tokenizer
    assert module.model.decoder.attention is not None if cfg.model.attention else True
    callbacks = [instantiate(c) for c in toy.callbacks.values() if c is not None]
    loggers = [instantiate(c) for c in toy.logger.values() if c is not None]
    trainer = instantiate(toy.trainer, callbacks=callbacks, logger=loggers)
    trainer.fit(module, datamodule=toy_data)
    assert trainer.global_step == 1 and "val_bleu" in trainer.callback_metrics
