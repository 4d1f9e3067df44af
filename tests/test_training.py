"""End to end on the synthetic task: learning, train.py, checkpoints, translate.py."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from seq2seq.averaging import average_checkpoints
from seq2seq.checkpoints import load_trained_model
from seq2seq.data.corpora import load_synthetic
from seq2seq.decoding import DecodingSettings
from seq2seq.search import output_limits
from seq2seq.tokenization import BOS_ID, EOS_ID, SubwordSettings, train_tokenizer
from seq2seq.training import train
from seq2seq.translator import Translator
from tests.conftest import tiny_model

REPO = Path(__file__).resolve().parents[1]
QUIET = ["trainer.enable_progress_bar=false"]


def run_script(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, input=stdin, timeout=600,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
    )  # fmt: skip


@pytest.mark.slow
def test_tiny_model_learns_the_reverse_task(compose_config, tmp_path):
    cfg = compose_config(
        "experiment=smoke", "trainer.max_steps=500", "trainer.val_check_interval=100", *QUIET
    )
    best_bleu = train(cfg)
    assert best_bleu >= 90
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "test.hyp").read_text().count("\n") == 200


def test_validation_every_so_much_training_time(compose_config, caplog):
    """trainer.val_check_interval as a duration (Lightning's DD:HH:MM:SS): a validation after each second of
    training here, however many steps that is on this machine, and one where max_time stops training."""
    cfg = compose_config(
        "experiment=smoke", "trainer.val_check_interval='00:00:00:01'", "trainer.max_time=00:00:00:05",
        "trainer.max_steps=-1", "evaluate.test=false", *QUIET,
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="seq2seq"):
        train(cfg)
    steps = [int(step) for step in re.findall(r"validation at step (\d+)", caplog.text)]
    assert len(steps) >= 3 and steps == sorted(set(steps))


@pytest.mark.slow
def test_attention_model_trains_translates_and_aligns(compose_config, tmp_path):
    cfg = compose_config("experiment=smoke", "model.attention=bahdanau", "decoding.beam=3", *QUIET)
    train(cfg)
    best = next((tmp_path / "run" / "checkpoints").glob("best-*.ckpt"))
    translator = Translator.from_checkpoint(best)
    alignment = translator.align("w1 w2 w3 w4", DecodingSettings(beam=3))
    assert alignment.source == ["▁w1", "▁w2", "▁w3", "▁w4"]
    assert alignment.weights.shape == (len(alignment.target), 4) and alignment.target[-1] == "</s>"
    torch.testing.assert_close(alignment.weights.sum(dim=1), torch.ones(len(alignment.target)))
    with pytest.raises(ValueError, match="needs a single model trained with attention"):
        Translator(tiny_model(), translator.tokenizer, 16).align("w1")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """Run ``python train.py experiment=smoke`` once; return its run directory."""
    root = tmp_path_factory.mktemp("smoke")
    result = run_script(
        "train.py",
        "experiment=smoke",
        f"hydra.run.dir={root / 'run'}",
        f"paths.cache_dir={root / 'cache'}",
        *QUIET,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (root / "run" / "stdout.txt").write_text(result.stdout)
    (root / "run" / "stderr.txt").write_text(result.stderr)
    return root / "run"


@pytest.mark.slow
def test_train_py_runs_end_to_end(smoke_run):
    stdout = (smoke_run / "stdout.txt").read_text()
    assert "BLEU = " in stdout and "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:" in stdout
    assert "chrF = " in stdout and "nc:6|nw:0|space:no" in stdout
    for name in (".hydra/config.yaml", "config_resolved.yaml", "logs/metrics.csv", "checkpoints/last.ckpt"):
        assert (smoke_run / name).is_file(), name
    assert "val_bleu" in (smoke_run / "logs" / "metrics.csv").read_text().splitlines()[0]
    # decoding.alpha=auto (the default): chosen on the validation split, recorded, stored, used.
    result = json.loads((smoke_run / "result.json").read_text())
    assert set(result["alpha_bleu"]) == {"0.6", "1.0", "1.5", "2.0"}
    assert result["alpha_bleu"][str(result["alpha"])] == max(result["alpha_bleu"].values())
    assert f"decoding.alpha=auto: alpha {result['alpha']:g} chosen" in (smoke_run / "train.log").read_text()
    assert f"beam 2, alpha {result['alpha']}," in stdout
    best = torch.load(result["checkpoint"], weights_only=False)
    assert best["hyper_parameters"]["decoding"]["alpha"] == result["alpha"]
    assert Translator.from_checkpoint(result["checkpoint"]).settings().alpha == result["alpha"]
    record = json.loads((smoke_run / "run.json").read_text())
    assert record["seed"] == 1234 and "experiment=smoke" in record["command"]
    assert record["packages"]["torch"] == version("torch")
    if (REPO / ".git").exists():
        assert len(record["git"]["commit"]) == 40


@pytest.mark.slow
def test_each_validation_is_one_line_in_the_log_and_on_a_redirected_console(smoke_run):
    """experiment=smoke validates at steps 30 and 60; stdout and stderr went to files (not a terminal)."""
    console = (smoke_run / "stdout.txt").read_text() + (smoke_run / "stderr.txt").read_text()
    result = json.loads((smoke_run / "result.json").read_text())
    for text in ((smoke_run / "train.log").read_text(), console):
        lines = [line for line in text.splitlines() if "validation at step" in line]
        assert [line.split("validation at step ")[1].split(" ")[0] for line in lines] == ["30", "60"]
        assert all(" | loss " in line and " | BLEU " in line and " | chrF " in line for line in lines)
        assert "new best saved: " in lines[0]  # the first validation is always the best so far
        best = max(float(line.split(" | BLEU ")[1].split(" ")[0]) for line in lines)
        assert f"best BLEU {best:.2f}" in lines[1] and f"{result['val_bleu']:.2f}" == f"{best:.2f}"
        saved_second = "new best saved: " in lines[1]
        assert saved_second == (
            float(lines[1].split(" | BLEU ")[1].split(" ")[0])
            > float(lines[0].split(" | BLEU ")[1].split(" ")[0])
        )


@pytest.fixture(scope="module")
def lone_checkpoint(smoke_run, tmp_path_factory) -> Path:
    """The best checkpoint copied alone into an empty folder, with the tokenizer cache deleted."""
    best = next((smoke_run / "checkpoints").glob("best-*.ckpt"))
    shutil.rmtree(smoke_run.parent / "cache")
    alone = tmp_path_factory.mktemp("alone") / "model.ckpt"
    shutil.copy(best, alone)
    return alone


@pytest.mark.slow
def test_checkpoint_alone_loads_and_translates(lone_checkpoint):
    translator = Translator.from_checkpoint(lone_checkpoint)
    sources = ["w1 w2 w3 w4", "w5 w6 w7", "", "w8 w9 w10 w11 w12"]
    for beam in (1, 3):
        outputs = translator.translate(sources, beam=beam)
        assert len(outputs) == 4 and outputs[2] == ""
    nbest = translator.translate_nbest(sources, DecodingSettings(beam=3, nbest=3))
    assert [len(hyps) for hyps in nbest] == [3, 3, 3, 3]


@pytest.mark.slow
def test_translate_py_keeps_every_line_in_order(lone_checkpoint, tmp_path, caplog):
    lines = ["w1 w2 w3", "", "   ", "w4 " * 2500, "Über den Wassern — 神の霊 🙂", "w5 w6", ""]
    source = tmp_path / "in.txt"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    output = tmp_path / "out.txt"
    result = run_script(
        "translate.py", f"ckpt={lone_checkpoint}", f"input={source}", f"output={output}", "beam=3"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    translated = output.read_text(encoding="utf-8").split("\n")
    assert translated[-1] == "" and len(translated) - 1 == len(lines)
    assert [t == "" for t in translated[:-1]] == [line.strip() == "" for line in lines]
    assert "input line 4:" in result.stderr and "truncated" in result.stderr
    assert "sentences/s" in result.stderr

    # stdin to stdout gives the same lines; stdout carries nothing else
    piped = run_script("translate.py", f"ckpt={lone_checkpoint}", "beam=3", stdin=source.read_text())
    assert piped.returncode == 0 and piped.stdout == output.read_text(encoding="utf-8")


@pytest.mark.slow
def test_translate_py_scores_against_references_and_writes_nbest(lone_checkpoint, tmp_path):
    source, reference = tmp_path / "test.src", tmp_path / "test.ref"
    source.write_text("w1 w2 w3\nw4 w5 w6 w7\n")
    reference.write_text("w3 w2 w1\nw7 w6 w5 w4\n")
    result = run_script(
        "translate.py", f"ckpt={lone_checkpoint}", f"input={source}", f"ref={reference}", "beam=2", "nbest=2"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "BLEU = " in result.stderr and "|tok:13a|smooth:exp|" in result.stderr
    rows = [line.split(" ||| ") for line in result.stdout.splitlines()]
    assert [row[0] for row in rows] == ["0", "0", "1", "1"]
    assert all(float(row[2]) <= 0 for row in rows)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda tmp, ckpt: [f"ckpt={tmp / 'nope.ckpt'}", "input=x"], "Checkpoint not found: {tmp}/nope.ckpt"),
        (lambda tmp, ckpt: [f"ckpt={_corrupt(tmp, ckpt)}"], "Cannot load checkpoint {tmp}/corrupt.ckpt"),
        (
            lambda tmp, ckpt: [f"ckpt={ckpt}", f"input={tmp / 'missing.de'}"],
            "Input file not found: {tmp}/missing.de",
        ),
    ],
)
def test_translate_py_bad_input_names_the_path(lone_checkpoint, tmp_path, make_args, message):
    result = run_script("translate.py", *make_args(tmp_path, lone_checkpoint))
    assert result.returncode != 0
    assert message.format(tmp=tmp_path) in result.stderr


def _corrupt(tmp: Path, checkpoint: Path) -> Path:
    """The first half of a real checkpoint: a truncated file."""
    data = checkpoint.read_bytes()
    (tmp / "corrupt.ckpt").write_bytes(data[: len(data) // 2])
    return tmp / "corrupt.ckpt"


@pytest.fixture(scope="module")
def other_checkpoint(lone_checkpoint, tmp_path_factory) -> Path:
    """The lone checkpoint with every weight moved by noise: another model of the same vocabulary."""
    checkpoint = torch.load(lone_checkpoint, weights_only=False)
    generator = torch.Generator().manual_seed(0)
    for name, weights in checkpoint["state_dict"].items():
        checkpoint["state_dict"][name] = weights + 0.3 * torch.randn(weights.shape, generator=generator)
    path = tmp_path_factory.mktemp("other") / "other.ckpt"
    torch.save(checkpoint, path)
    return path


@pytest.mark.slow
def test_averaging_two_checkpoints_gives_the_mean_of_their_weights(
    lone_checkpoint, other_checkpoint, tmp_path
):
    averaged = tmp_path / "averaged.ckpt"
    average_checkpoints([lone_checkpoint, other_checkpoint], averaged)
    first, second, result = (
        torch.load(p, weights_only=False) for p in (lone_checkpoint, other_checkpoint, averaged)
    )
    assert result["state_dict"].keys() == first["state_dict"].keys()
    for name, weights in first["state_dict"].items():
        assert not torch.equal(weights, second["state_dict"][name])
        torch.testing.assert_close(result["state_dict"][name], (weights + second["state_dict"][name]) / 2)
    assert "optimizer_states" not in result and result["tokenizer"] == first["tokenizer"]
    assert len(Translator.from_checkpoint(averaged).translate(["w1 w2 w3", "w4 w5"])) == 2


@torch.no_grad()
def greedy_by_hand(checkpoints: list[Path], sentence: str, settings: DecodingSettings) -> str:
    """Greedy decoding of an ensemble written out: each model steps on its own state; the next token is
    the argmax of the mean of their log-probabilities."""
    modules = [load_trained_model(path) for path in checkpoints]
    tokenizer = modules[0].tokenizer
    source = tokenizer.encode_src([sentence])[0]
    src, lengths = torch.tensor([source]), torch.tensor([len(source)])
    limit = int(output_limits(lengths, settings.max_len_a, settings.max_len_b)[0])
    states = [module.model.encode(src, lengths) for module in modules]
    tokens, previous = [], BOS_ID
    while len(tokens) < limit:
        steps = [
            m.model.decode_step(torch.tensor([previous]), s) for m, s in zip(modules, states, strict=True)
        ]
        states = [state for _, state in steps]
        mean = sum(log_probs for log_probs, _ in steps) / len(steps)  # (1, V)
        previous = int(mean.argmax())
        if previous == EOS_ID:
            break
        tokens.append(previous)
    return tokenizer.decode_tgt([tokens])[0]


@pytest.mark.slow
def test_ensemble_of_different_checkpoints_decodes_with_the_mean_of_log_probabilities(
    lone_checkpoint, other_checkpoint, tmp_path
):
    sources = ["w1 w2 w3", "", "w4 w5 w6 w7", "w8", "w9 w3 w3 w1 w5"]
    greedy = DecodingSettings(beam=1)
    pair = Translator.from_checkpoints([lone_checkpoint, other_checkpoint])
    exact = {"beam": 1, "quantize": "none", "shortlist": False}  # the models' own fp32 log-probabilities
    outputs = pair.translate(sources, **exact)
    assert outputs == [
        greedy_by_hand([lone_checkpoint, other_checkpoint], s, greedy) if s else "" for s in sources
    ]
    singles = [
        Translator.from_checkpoint(p).translate(sources, **exact) for p in (lone_checkpoint, other_checkpoint)
    ]
    assert singles[0] == [greedy_by_hand([lone_checkpoint], s, greedy) if s else "" for s in sources]
    assert outputs != singles[0] or outputs != singles[1]  # the models differ enough to tell a mean apart
    source = tmp_path / "in.txt"
    source.write_text("\n".join(sources) + "\n")
    result = run_script(
        "translate.py", f"ckpt=[{lone_checkpoint},{other_checkpoint}]", f"input={source}", "beam=1",
        "quantize=none", "shortlist=false",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "".join(line + "\n" for line in outputs)


@pytest.mark.slow
def test_ensembles_and_averages_need_one_vocabulary(lone_checkpoint, tmp_path):
    corpus = load_synthetic("copy", 30, 2, 6, {"train": 300, "valid": 5, "test": 5}, seed=3)
    settings = SubwordSettings(vocab_size=40, model_type="word")
    other = train_tokenizer(corpus.train.src, corpus.train.tgt, settings)
    checkpoint = torch.load(lone_checkpoint, weights_only=False)
    checkpoint["tokenizer"] = other.state_dict()
    foreign = tmp_path / "other_vocabulary.ckpt"
    torch.save(checkpoint, foreign)
    with pytest.raises(ValueError, match=r"An ensemble needs one vocabulary: .*other_vocabulary\.ckpt"):
        Translator.from_checkpoints([lone_checkpoint, foreign])
    with pytest.raises(ValueError, match=r"other_vocabulary\.ckpt has another sentencepiece model"):
        average_checkpoints([lone_checkpoint, foreign], tmp_path / "averaged.ckpt")


@pytest.mark.slow
def test_periodic_checkpoints_average_into_a_translating_checkpoint(compose_config, tmp_path):
    cfg = compose_config(
        "experiment=smoke", "trainer.max_steps=40", "callbacks=averaging",
        "callbacks.periodic_checkpoint.every_n_train_steps=10", "decoding.beam=1", *QUIET,
    )  # fmt: skip
    train(cfg)
    periodic = sorted((tmp_path / "run" / "checkpoints" / "periodic").glob("*.ckpt"))
    assert [p.name for p in periodic] == [f"step000{n}.ckpt" for n in (10, 20, 30, 40)]
    assert "optimizer_states" not in torch.load(periodic[-1], weights_only=False)  # weights only
    averaged = tmp_path / "averaged.ckpt"
    average_checkpoints(periodic[-2:], averaged)
    weights = [torch.load(p, weights_only=False)["state_dict"] for p in (*periodic[-2:], averaged)]
    for name, mean in weights[2].items():
        torch.testing.assert_close(mean, (weights[0][name] + weights[1][name]) / 2)
    assert len(Translator.from_checkpoint(averaged).translate(["w1 w2 w3", "w4"])) == 2
