"""Fine-tuning (init_from): a new run from a checkpoint's weights, vocabulary and architecture."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from seq2seq.checkpoints import check_architecture
from seq2seq.data.corpora import load_synthetic
from seq2seq.metrics import corpus_scores
from seq2seq.training import train
from seq2seq.translator import Translator
from tests.test_training import QUIET, run_script

FAST = ["experiment=smoke", "decoding.beam=1", "evaluate.test=false", *QUIET]


@pytest.fixture(scope="module")
def reverse_checkpoint(tmp_path_factory) -> Path:
    """A tiny model trained on the synthetic reverse task (the smoke experiment)."""
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF_DIR

    root = tmp_path_factory.mktemp("base")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "config", [f"paths.output_dir={root / 'run'}", f"paths.cache_dir={root / 'cache'}", *FAST]
        )
    train(cfg)
    return next((root / "run" / "checkpoints").glob("best-*.ckpt"))


def copy_task_bleu(checkpoint: Path) -> float:
    valid = load_synthetic("copy", 20, 3, 8, {"train": 0, "valid": 200, "test": 0}, seed=7).valid
    translations = Translator.from_checkpoint(checkpoint).translate(valid.src)
    return corpus_scores(translations, valid.tgt).bleu


@pytest.mark.slow
def test_fine_tuning_keeps_the_vocabulary_and_learns_the_new_corpus(
    reverse_checkpoint, compose_config, tmp_path
):
    # Another corpus (copy instead of reverse), whose own subword settings would build another vocabulary.
    cfg = compose_config(
        *FAST, f"init_from={reverse_checkpoint}", "data.corpus.task=copy", "data.subword.model_type=char"
    )
    train(cfg)
    tuned = next((tmp_path / "run" / "checkpoints").glob("best-*.ckpt"))
    base, new = (torch.load(p, weights_only=False) for p in (reverse_checkpoint, tuned))
    assert new["tokenizer"] == base["tokenizer"]
    assert new["hyper_parameters"]["model"] == base["hyper_parameters"]["model"]
    assert new["global_step"] == 60  # a new run: its own step count, not the base run's 60 + 60
    before, after = copy_task_bleu(reverse_checkpoint), copy_task_bleu(tuned)
    assert after > before + 20, (before, after)


def test_fine_tuning_takes_the_architecture_from_the_checkpoint():
    checkpoint = {"hidden_size": 32, "attention": None, "encoder": {"layers": 1}}
    composed = {"hidden_size": 64, "attention": None, "encoder": {"layers": 1}}
    check_architecture(composed, checkpoint, ["data.corpus.task=copy", "model.attention=null"])  # agree
    with pytest.raises(ValueError, match=r"^init_from: model.hidden_size=64 conflicts with the checkpoint's"):
        check_architecture(composed, checkpoint, ["model.hidden_size=64"])
    with pytest.raises(
        ValueError, match=r"^init_from: model=small conflicts .*model.hidden_size: 64 here, 32"
    ):
        check_architecture(composed, checkpoint, ["model=small"])
    with pytest.raises(ValueError, match=r"model.encoder.layers=2 conflicts"):
        check_architecture({**composed, "encoder": {"layers": 2}}, checkpoint, ["model.encoder.layers=2"])


@pytest.mark.parametrize(
    "options, message",
    [
        (["init_from=CKPT", "model.hidden_size=7"], "init_from: model.hidden_size=7 conflicts"),
        (["init_from=CKPT", "ckpt_path=CKPT"], r"ckpt_path \(resume a run exactly\) and init_from"),
        (["init_from=TMP/none.ckpt"], "init_from: Checkpoint not found"),
        (["init_from=TMP/other.pt"], "init_from: .*other.pt is not a checkpoint of this toolkit"),
    ],
)
def test_bad_fine_tuning_options_are_one_line_errors(reverse_checkpoint, tmp_path, options, message):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")  # a checkpoint of another kind
    options = [o.replace("CKPT", str(reverse_checkpoint)).replace("TMP", str(tmp_path)) for o in options]
    paths = [f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    result = run_script("train.py", *FAST, *paths, *options)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(message, errors[0]), result.stderr[-2000:]
