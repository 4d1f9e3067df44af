"""Bad input, faults and mistakes: each fails clearly, naming what is at fault, and loses nothing."""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, InstantiationException, MissingConfigException
from hydra.utils import instantiate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from seq2seq.averaging import average_checkpoints
from seq2seq.cli import is_user_error
from seq2seq.data.corpora import ParallelText, load_synthetic
from seq2seq.data.datamodule import TranslationDataModule
from seq2seq.decoding import DecodingSettings
from seq2seq.errors import MissingFileError, UserError, user_path
from seq2seq.evaluation import tune_alpha
from seq2seq.precision import resolve_trainer_precision
from seq2seq.tokenization import SubwordSettings, train_tokenizer
from seq2seq.training import train
from seq2seq.translator import Translator, translate_file
from tests.conftest import tiny_model
from tests.fault_callbacks import read_records
from tests.test_distributed import STOP_ONLY, checkpoint_state, record, wait_for_step
from tests.test_training import QUIET, REPO, run_script

NAN_AT_BATCH_3 = ["+callbacks.nan._target_=tests.fault_callbacks.NanAtBatch", "+callbacks.nan.batch=3"]


@pytest.fixture(scope="module")
def random_translator() -> Translator:
    """An untrained model with a real sentencepiece model: what it outputs does not matter here."""
    corpus = load_synthetic("copy", 8, 2, 6, {"train": 300, "valid": 5, "test": 5}, seed=1)
    tokenizer = train_tokenizer(
        corpus.train.src,
        corpus.train.tgt,
        SubwordSettings(vocab_size=12, model_type="word"),
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
@pytest.mark.slow
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


@pytest.fixture
def umask_027():
    """The umask of a shared cluster's group: files we write must be group-readable under it."""
    previous = os.umask(0o027)
    yield 0o666 & ~0o027
    os.umask(previous)


def test_written_files_get_the_users_umask_not_private_modes(random_translator, tmp_path, umask_027):
    source = write_lines(tmp_path / "in.txt", ["w1 w2", "w3"])
    translate_file(random_translator, str(source), str(tmp_path / "out.txt"), progress=False)
    checkpoint = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "tokenizer": None}, checkpoint)
    average_checkpoints([checkpoint, checkpoint], tmp_path / "averaged.ckpt")
    for name in ("out.txt", "averaged.ckpt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == umask_027, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["averaged.ckpt", "in.txt", "model.ckpt", "out.txt"]


def test_alpha_is_not_tuned_when_every_alpha_scores_the_same(random_translator, caplog):
    valid = ParallelText(["w1 w2", "w3 w4 w5"], ["zz yy", "xx"], origin="test")
    caplog.set_level(logging.INFO)
    # A checkpoint path that does not exist: storing the choice there would fail.
    choice = tune_alpha(
        random_translator, "/nonexistent.ckpt", valid, DecodingSettings(beam=2), [0.6, 1.0, 2.0]
    )
    assert choice.tied and set(choice.bleu.values()) == {0.0}
    assert "not tuned, every alpha scores BLEU 0.00" in caplog.text


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss_stops_naming_the_step_or_skips_it(compose_config, tmp_path, caplog, policy):
    cfg = compose_config(
        "experiment=smoke", "trainer.max_steps=10", "trainer.val_check_interval=10", "decoding.beam=1",
        f"module.nonfinite_loss={policy}", *NAN_AT_BATCH_3, *QUIET,
    )  # fmt: skip
    if policy == "stop":
        with pytest.raises(
            FloatingPointError,
            match=r"Non-finite training loss \(nan\) at step 3; the weights were not updated",
        ):
            train(cfg)
        return
    caplog.set_level(logging.WARNING, logger="seq2seq.module")
    train(cfg)
    assert (
        "Skipped 1 step(s) with a non-finite training loss so far; the first: (nan) at step 3" in caplog.text
    )
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
    options = "Available options in 'model': base large small tiny"
    assert (result.returncode, result.stderr) == (
        2,
        f"error: In 'config': Could not find 'model/huge' {options}\n",
    )
    assert not run.exists() and not (tmp_path / "sentencepiece").exists()


def train_in(folder: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python train.py`` run from ``folder``, so its default outputs/DATE/TIME/ goes there."""
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), f"paths.cache_dir={folder / 'cache'}", *QUIET, *overrides],
        cwd=folder, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip


@pytest.mark.slow
def test_train_mistakes_print_one_line_exit_2_and_leave_no_outputs(tmp_path):
    valid = write_lines(tmp_path / "valid.txt", ["w1 w2"])
    missing = tmp_path / "missing.de"
    files = [f"data.corpus.{name}={valid}" for name in ("valid_src", "valid_tgt", "train_tgt")]
    cases = [
        ([*files, f"data.corpus.train_src={missing}"], f"error: Corpus file not found: {missing}\n"),
        (["experiment=smoke", "model.hidden_size=-1"], "error: model.hidden_size must be positive, got -1\n"),
        (
            files[:2],  # data=files without data.corpus.train_src and train_tgt
            "error: Missing mandatory value(s): data.corpus.train_src, data.corpus.train_tgt"
            " (give them on the command line: key=value)\n",
        ),
    ]
    for overrides, message in cases:
        result = train_in(tmp_path, "data=files" if "data.corpus" in overrides[0] else "seed=1", *overrides)
        assert (result.returncode, result.stderr[-len(message) :]) == (2, message), result.stderr[-3000:]
        assert "Traceback" not in result.stdout + result.stderr
        assert not (tmp_path / "outputs").exists()  # the run directory Hydra made is gone again


@pytest.mark.slow
def test_a_prepare_mistake_prints_one_line_and_exits_2(tmp_path):
    valid = write_lines(tmp_path / "valid.txt", ["w1 w2"])
    missing, not_a_folder = tmp_path / "missing.de", write_lines(tmp_path / "file", [])
    files = [f"data.corpus.{name}={valid}" for name in ("valid_src", "valid_tgt", "train_tgt")]
    cases = [
        ([f"data.corpus.train_src={missing}"], f"error: Corpus file not found: {missing}\n"),
        (  # the OS refuses a path the user gave: named, with the option
            [f"data.corpus.train_src={valid}", f"paths.cache_dir={not_a_folder}"],
            f"error: paths.cache_dir: {not_a_folder}: Not a directory\n",
        ),
    ]
    for overrides, message in cases:
        result = run_script(
            "-m", "seq2seq.prepare", "data=files", *files, f"paths.cache_dir={tmp_path}", *overrides
        )
        assert (result.returncode, result.stderr[-len(message) :]) == (2, message), result.stderr[-3000:]
        assert "Traceback" not in result.stderr


def broken_target(size: int) -> str:
    """A config target with a bug of its own: a TypeError raised inside it."""
    return size + "s"


@pytest.mark.parametrize(
    ("config", "mistake"),
    [
        ({"_target_": "seq2seq.decoding.DecodingSettings", "beam": 0}, True),  # the target's UserError
        ({"_target_": "seq2seq.decoding.DecodingSettings", "no_such_key": 1}, True),  # an unknown key
        ({"_target_": "seq2seq.no_such_module.Thing"}, True),  # no such target
        ({"_target_": "tests.test_robustness.broken_target", "size": 1}, False),  # a TypeError inside
        ({"_target_": "builtins.int", "_args_": ["x"]}, False),  # a ValueError inside
    ],
)
def test_a_config_target_failure_is_a_mistake_only_where_the_config_is_at_fault(config, mistake):
    with pytest.raises(InstantiationException) as caught:
        instantiate(config)
    assert is_user_error(caught.value) is mistake


def test_only_user_errors_and_config_errors_are_mistakes():
    mistakes = [UserError("x"), MissingFileError("x"), ConfigCompositionException("x")]
    bugs = [ValueError("x"), FileNotFoundError("x"), OSError(errno.EIO, "x"), RuntimeError("x")]
    assert [is_user_error(error) for error in mistakes + bugs] == [True] * 3 + [False] * 4


def test_the_os_refusing_a_user_path_is_a_mistake_naming_it_other_os_errors_are_not(tmp_path):
    missing = tmp_path / "no" / "x"
    message = rf"^output: {missing}: No such file or directory$"
    with pytest.raises(MissingFileError, match=message), user_path(missing, "output"):
        missing.write_text("")
    with pytest.raises(UserError, match=r"Is a directory$"), user_path(tmp_path):
        tmp_path.read_text()
    with pytest.raises(OSError) as caught, user_path(tmp_path):  # a disk error, not the path's fault
        raise OSError(errno.EIO, "Input/output error")
    assert not isinstance(caught.value, UserError)


@pytest.mark.slow
def test_a_bug_inside_training_keeps_its_traceback_and_exits_1(tmp_path):
    bug = ["+callbacks.bug._target_=tests.fault_callbacks.BugAtBatch", "+callbacks.bug.batch=1"]
    result = train_in(tmp_path, "experiment=smoke", *bug, "hydra.run.dir=run")
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.count("Traceback") == 1 and "\nerror: " not in result.stderr
    assert result.stderr.rstrip().endswith("ValueError: zip() argument 2 is shorter than argument 1")
    assert "Traceback" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.slow
def test_a_failure_in_training_keeps_its_traceback_once_and_its_run_directory(tmp_path):
    result = train_in(tmp_path, "experiment=smoke", *NAN_AT_BATCH_3, "hydra.run.dir=run")
    assert result.returncode == 1
    assert result.stderr.count("Traceback") == 1 and "Traceback" not in result.stdout
    assert "FloatingPointError: Non-finite training loss (nan) at step 3" in result.stderr
    # The policy is applied on the next logging step (no device wait each step); the error names step 3.
    assert re.search(r"Stopped by an error \(FloatingPointError\) at step \d+", result.stdout)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "Traceback" in log and (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "failed"


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
    expected = (
        "truncated or not a checkpoint" if kind == "truncated" else "is not a checkpoint of this toolkit"
    )
    with pytest.raises(ValueError, match=f"{path}.*{expected}"):
        Translator.from_checkpoint(path)
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
    precision = resolve_trainer_precision(toy.trainer.precision, toy.trainer.accelerator)  # as train() does
    trainer = instantiate(toy.trainer, callbacks=callbacks, logger=loggers, precision=precision)
    trainer.fit(module, datamodule=toy_data)
    assert trainer.global_step == 1 and "val_bleu" in trainer.callback_metrics


def fake_slurm(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The environment of a one-task SLURM job (job 4242) whose ``scontrol`` only writes its arguments to
    the returned file."""
    bin_dir, requeues = tmp_path / "bin", tmp_path / "requeues.txt"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {requeues}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
    }  # fmt: skip
    return {**os.environ, **slurm, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, requeues


def wait_for_file(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)


@pytest.mark.slow
def test_sigterm_and_slurm_requeue_on_sigusr1(tmp_path):
    """As on SLURM with ``#SBATCH --signal=SIGUSR1@90`` and ``hydra.run.dir=outputs/slurm-${SLURM_JOB_ID}``:
    SIGUSR1 saves an HPC checkpoint (only the newest is kept) and calls ``scontrol requeue`` (a fake one
    here); SLURM's SIGTERM then stops the run with exit 143 after saving last.ckpt; the requeued job,
    started the same way in the same run directory, resumes from the newer of the two by itself."""
    env, requeues = fake_slurm(tmp_path)
    run, cache = tmp_path / "slurm-4242", tmp_path / "cache"
    job = [sys.executable, "train.py", "experiment=smoke", f"hydra.run.dir={run}", f"paths.cache_dir={cache}"]
    process = subprocess.Popen(
        [*job, *QUIET, *STOP_ONLY, "trainer.max_steps=100000"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for_step(process, min_step=5)
    process.send_signal(signal.SIGUSR1)
    wait_for_file(run / "hpc_ckpt_1.ckpt")
    wait_for_step(process, min_step=checkpoint_state(run / "hpc_ckpt_1.ckpt")[0] + 2)
    process.send_signal(signal.SIGUSR1)  # a second warning: a second HPC checkpoint replaces the first
    hpc = run / "hpc_ckpt_2.ckpt"
    wait_for_file(hpc)
    wait_for_step(process, min_step=checkpoint_state(hpc)[0] + 2)  # training goes on until SLURM stops it
    assert requeues.read_text() == "requeue 4242\n" * 2
    assert [p.name for p in run.glob("hpc_ckpt_*")] == ["hpc_ckpt_2.ckpt"]
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    said = re.search(r"Stopped by SIGTERM at step (\d+), epoch \d+: saved (\S+);", stdout)
    assert said and said[0] in (run / "train.log").read_text()
    assert "Received SIGTERM" not in stdout + stderr  # Lightning's own notice: ours says it all
    assert checkpoint_state(Path(said[2]))[0] == int(said[1]) > checkpoint_state(hpc)[0]

    # The requeued job: the same command line and run directory; it resumes from the newer last.ckpt.
    resumed_from = int(said[1])
    requeued = subprocess.run(
        [*job, *QUIET, f"trainer.max_steps={resumed_from + 5}", "trainer.val_check_interval=5",
         *record(tmp_path / "batches")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"Requeued SLURM job: resuming from {Path(said[2])}" in requeued.stdout
    trained = [r["step"] for r in read_records(tmp_path / "batches")]
    assert trained == list(range(resumed_from, resumed_from + 5))
    assert checkpoint_state(run / "checkpoints" / "last.ckpt")[0] == resumed_from + 5


@pytest.mark.slow
@pytest.mark.parametrize(
    ("phase", "line"), [("data preparation", "Preparing data into"), ("evaluation", "Best checkpoint:")]
)
@pytest.mark.slow
def test_slurm_requeue_signal_outside_fit_requeues_and_the_job_goes_on(tmp_path, phase, line):
    """SIGUSR1 while the data is prepared (a corpus big enough to take seconds) or after training,
    while the best checkpoint is evaluated: the job is requeued, not killed; the requeued job of a
    run whose training had ended goes straight to the evaluation."""
    env, requeues = fake_slurm(tmp_path)
    run, cache = tmp_path / "slurm-4242", tmp_path / "cache"
    short = ["trainer.max_steps=10", "trainer.val_check_interval=10", "data.corpus.sizes.train=60000"]
    job = [sys.executable, "train.py", "experiment=smoke", f"hydra.run.dir={run}", f"paths.cache_dir={cache}"]
    job += [*QUIET, *short]
    process = subprocess.Popen(
        job, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    seen = ""
    while line not in seen:
        seen = process.stdout.readline()
        assert seen or process.poll() is None, process.stderr.read()[-3000:]
    process.send_signal(signal.SIGUSR1)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]  # the fake scontrol does not stop the job
    assert f"SLURM requeue signal {int(signal.SIGUSR1)} during {phase}" in stdout
    assert requeues.read_text() == "requeue 4242\n" and not any(run.glob("hpc_ckpt_*"))
    requeued = subprocess.run(
        [*job, *record(tmp_path / "batches")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert "Requeued SLURM job: resuming from" in requeued.stdout and "Best checkpoint:" in requeued.stdout
    assert not Path(f"{tmp_path / 'batches'}.rank0").exists()  # no training step: it had ended
    assert json.loads((run / "result.json").read_text())["status"] == "ok"


@pytest.fixture(scope="module")
def attention_run(tmp_path_factory) -> Path:
    """``python train.py`` with stdout to a pipe, as in a batch job, for an attention model that keeps
    its latest 2 periodic checkpoints; returns the run directory (stdout.txt, stderr.txt beside it)."""
    root = tmp_path_factory.mktemp("attention")
    result = run_script(
        "train.py", "experiment=smoke", "model.attention=bahdanau", f"hydra.run.dir={root / 'run'}",
        f"paths.cache_dir={root / 'cache'}", "callbacks.progress_log.every_seconds=0", "callbacks=averaging",
        "callbacks.periodic_checkpoint.every_n_train_steps=10", "callbacks.periodic_checkpoint.save_top_k=2",
        "trainer.max_steps=30", "trainer.val_check_interval=30",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (root / "stdout.txt").write_text(result.stdout)
    (root / "stderr.txt").write_text(result.stderr)
    return root / "run"


PROGRESS_LINE = (
    r"step \d+ \| epoch \d+ \| loss \d+\.\d{3} \| [\d,]+ target tokens/s \| elapsed \d+:\d\d:\d\d"
    r" \| left \d+:\d\d:\d\d \(max_steps\)"
)


@pytest.mark.slow
def test_a_run_in_a_log_file_says_what_matters_without_noise(attention_run):
    stdout = (attention_run.parent / "stdout.txt").read_text()
    console = stdout + (attention_run.parent / "stderr.txt").read_text()
    log = (attention_run / "train.log").read_text()
    # Plain progress lines, on the console and in train.log, the time left counted against max_steps.
    progress = re.findall(PROGRESS_LINE, stdout)
    assert progress and all(line in log for line in progress)
    # The start: the vocabulary sentencepiece really built, parameters, where outputs go.
    checkpoint = torch.load(attention_run / "checkpoints" / "last.ckpt", weights_only=False)
    built = Translator.from_checkpoint(attention_run / "checkpoints" / "last.ckpt").tokenizer.src_vocab_size
    assert f"Vocabulary: joint, {built} subwords (data.subword.vocab_size=32)" in log and built < 32
    parameters = sum(weights.numel() for weights in checkpoint["state_dict"].values())
    assert f"Model: {parameters:,} parameters" in log and f"Outputs: {attention_run}" in log
    # No progress bar frames or terminal control sequences: stdout is not a terminal.
    assert "\x1b[" not in console and "\r" not in console and not re.search(r"Epoch \d+/\d+", console)
    # None of the third-party lines that tell a user nothing.
    for noise in ("Tip:", "LeafSpec", "flops_per_batch", "weights_only", "logging interval", "INFO: "):
        assert noise not in console, noise
    # ThroughputMonitor reports FLOP/s from the project's FLOP count.
    metrics = list(csv.DictReader((attention_run / "logs" / "metrics.csv").open()))
    assert any(float(row["train/device/flops_per_sec"] or 0) > 0 for row in metrics)


def test_best_checkpoints_hold_no_optimizer_and_periodic_ones_are_bounded(attention_run):
    checkpoints = attention_run / "checkpoints"
    last, (best,) = checkpoints / "last.ckpt", list(checkpoints.glob("best-*.ckpt"))
    assert "optimizer_states" in torch.load(last, weights_only=False)  # resume needs it
    assert "optimizer_states" not in torch.load(best, weights_only=False)
    assert best.stat().st_size < last.stat().st_size / 2
    Translator.from_checkpoint(best).translate(["w1 w2"])  # weights, tokenizer and config: it translates
    periodic = sorted(p.name for p in (checkpoints / "periodic").iterdir())
    assert periodic == ["step00020.ckpt", "step00030.ckpt"]  # the latest 2, as save_top_k says


def readme_python_snippet() -> str:
    """The Python snippet of docs/translating.md (the README's until the docs moved there)."""
    page = (REPO / "docs" / "translating.md").read_text(encoding="utf-8")
    snippets = re.findall(r"\nFrom Python.*?```python\n(.*?)```", page, flags=re.S)
    assert len(snippets) == 1
    return snippets[0]


def test_the_readme_python_snippet_runs_as_written(attention_run, tmp_path):
    best = next((attention_run / "checkpoints").glob("best-*.ckpt"))
    for name in ("model.ckpt", "run1.ckpt", "run2.ckpt"):  # the names the snippet uses
        (tmp_path / name).symlink_to(best)
    result = subprocess.run(
        [sys.executable, "-c", readme_python_snippet()], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_translate_with_a_terminal_on_stdin_answers_each_line_as_entered(attention_run):
    best = next((attention_run / "checkpoints").glob("best-*.ckpt"))
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "translate.py", f"ckpt={best}"], cwd=REPO, stdin=terminal, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    os.close(terminal)

    def read_stderr_until(text: bytes) -> bytes:
        seen = b""
        while text not in seen:
            ready, _, _ = select.select([process.stderr], [], [], 120)
            assert ready, f"no {text!r} on stderr; got {seen!r}"
            seen += os.read(process.stderr.fileno(), 4096)
        return seen

    try:
        # A ready line once the model is loaded, then a prompt before each line.
        assert b"Ready: type a sentence" in read_stderr_until(b"> ")
        for line in ("w1 w2 w3", "w4 w5"):
            time.sleep(4)  # the user types: idle time that the final rate must not count
            os.write(controller, f"{line}\n".encode())
            # The translation comes back while the input is still open: not at the end of a chunk.
            ready, _, _ = select.select([process.stdout], [], [], 120)
            assert ready, f"no translation of {line!r} while waiting for the next line"
            assert process.stdout.readline().endswith(b"\n")
            read_stderr_until(b"> ")
        os.write(controller, b"\x04")  # Ctrl-D: end of input
        assert process.wait(timeout=60) == 0
        report = process.stderr.read().decode()
        seconds = float(re.search(r"Translated 2 lines in ([\d.]+) s", report).group(1))
        assert seconds < 8  # the time spent translating, without the 8 s of waiting for input
    finally:
        process.kill()
        os.close(controller)


def test_translate_mistakes_print_one_line_and_exit_2(attention_run, tmp_path):
    best = next((attention_run / "checkpoints").glob("best-*.ckpt"))
    missing = tmp_path / "missing.txt"
    cases = [
        ([f"ckpt={tmp_path / 'none.ckpt'}"], f"error: Checkpoint not found: {tmp_path / 'none.ckpt'}\n"),
        ([f"ckpt={best}", f"input={missing}"], f"error: Input file not found: {missing}\n"),
        (["beam=3"], "error: Missing mandatory value: ckpt (give it on the command line: key=value)\n"),
    ]
    for overrides, message in cases:
        result = run_script("translate.py", *overrides)
        assert (result.returncode, result.stderr[-len(message) :]) == (2, message)
        assert "Traceback" not in result.stderr and result.stdout == ""
    # HYDRA_FULL_ERROR=1 shows the traceback.
    result = subprocess.run(
        [sys.executable, "translate.py", f"ckpt={tmp_path / 'none.ckpt'}"], cwd=REPO, capture_output=True,
        text=True, env={**os.environ, "HYDRA_FULL_ERROR": "1"},
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" in result.stderr and "MissingFileError" in result.stderr


def test_help_lists_groups_options_and_main_keys_with_current_values():
    train = run_script("train.py", "--help")
    assert train.returncode == 0
    assert (
        "model: base, large, small, tiny" in train.stdout
        and "trainer: cpu, ddp, ddp_cpu, gpu" in train.stdout
    )
    assert "model.hidden_size=512" in train.stdout and "decoding.alpha=auto" in train.stdout
    assert "model.hidden_size=512" in train.stdout and "trainer.max_time=00:00:28:00" in train.stdout
    assert "ckpt_path=None" in train.stdout and "init_from=None" in train.stdout
    assert "\ndata: bible, " in train.stdout and "_shared" not in train.stdout  # a part, not an option
    assert "model.hidden_size=1024" in run_script("train.py", "model=base", "--help").stdout
    translate = run_script("translate.py", "--help")
    assert translate.returncode == 0
    assert "ckpt: ???" in translate.stdout and "beam: 5" in translate.stdout


def test_in_a_terminal_the_progress_bar_shows_the_time_left(compose_config, monkeypatch, capsys, caplog):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    caplog.set_level(logging.INFO, logger="seq2seq.callbacks")
    steps = ["trainer.max_steps=6", "trainer.val_check_interval=6", "callbacks.progress_log.every_seconds=0"]
    train(compose_config("experiment=smoke", *steps))
    # The bar's metrics (rich prints its last state even to a captured stream) hold the time left...
    assert re.search(r"left: \d+:\d\d:\d\d", capsys.readouterr().out)
    assert "target tokens/s" not in caplog.text  # ...and no plain progress lines get in its way.
