"""What a new user trips over in the first hour: time budgets across resumes, short runs, early and
helpful errors from the command line."""

from __future__ import annotations

import json
import logging
import re
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch

from seq2seq.callbacks import FinalValidation
from seq2seq.training import train
from seq2seq.translator import Translator
from tests.test_training import QUIET, run_script

HOUR = "00:01:00:00"
PROGRESS = re.compile(r"elapsed (\d+:\d\d:\d\d) \| left (\d+:\d\d:\d\d) \(max_time\)")


def seconds(clock: str) -> int:
    hours, minutes, secs = (int(part) for part in clock.split(":"))
    return int(timedelta(hours=hours, minutes=minutes, seconds=secs).total_seconds())


@pytest.mark.slow
def test_a_short_run_validates_at_its_end_and_resumes_within_its_time_budget(
    compose_config, tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    common = ["experiment=smoke", "callbacks.progress_log.every_seconds=0", *QUIET]
    # 12 steps with validation every 500: only the validation at the end gives a best checkpoint.
    first = compose_config(
        *common, "trainer.max_steps=12", "trainer.val_check_interval=500", f"trainer.max_time={HOUR}"
    )
    train(first)
    checkpoints = tmp_path / "run" / "checkpoints"
    (best,) = checkpoints.glob("best-*.ckpt")
    assert best.name.startswith("best-step12-")
    # One validation: too few for the length penalty to matter (evaluate.min_validations=2).
    assert "decoding.alpha=auto: not tuned, the run validated 1 time(s)" in caplog.text
    assert "no length penalty was chosen" not in caplog.text  # the test split decodes without a warning
    assert re.search(
        r"Time by phase: validation \d+ s \(1 validations while training\), alpha tuning -,"
        r" test decoding \d+ s",
        caplog.text,
    )
    last = checkpoints / "last.ckpt"
    used = torch.load(last, weights_only=False)["callbacks"]["Timer"]["time_elapsed"]["train"]

    # A resume whose budget the run already used fails at once, naming the time used and the option. The
    # checkpoint says an hour was used (12 steps take under a second on a fast host).
    hour_used = torch.load(last, weights_only=False)
    hour_used["callbacks"]["Timer"]["time_elapsed"]["train"] = 3600.0
    torch.save(hour_used, tmp_path / "hour_used.ckpt")
    spent = tmp_path / "spent"
    with pytest.raises(ValueError, match=r"already trained for 1:00:00, all of trainer.max_time=00:00:30:00"):
        train(
            compose_config(
                *common,
                f"ckpt_path={tmp_path / 'hour_used.ckpt'}",
                "trainer.max_time=00:00:30:00",
                f"paths.output_dir={spent}",
            )
        )
    assert not spent.exists()  # before anything was written or loaded

    # Resumed with budget left: elapsed counts the whole run, as max_time does, and left is never negative.
    caplog.clear()
    budget = int(used) + 15
    max_time = f"trainer.max_time=00:00:{budget // 60:02d}:{budget % 60:02d}"
    resumed = compose_config(
        *common,
        f"ckpt_path={last}",
        "trainer.max_steps=-1",
        max_time,
        f"paths.output_dir={tmp_path / 'resumed'}",
    )
    train(resumed)
    lines = [(seconds(elapsed), seconds(left)) for elapsed, left in PROGRESS.findall(caplog.text)]
    assert lines and lines[0][0] >= int(used)
    assert all(left >= 0 and abs(elapsed + left - budget) <= 2 for elapsed, left in lines)


@pytest.mark.slow
def test_a_small_corpus_validates_every_epoch_tunes_alpha_and_its_last_checkpoint_translates(
    compose_config, tmp_path, caplog
):
    """300 pairs make 6 batches an epoch, fewer than the default trainer.val_check_interval of 500: the
    run validates at the end of each epoch (evaluate.validate_every_epoch), often enough to tune alpha."""
    caplog.set_level(logging.INFO)
    cfg = compose_config(
        "data=toy", "data.corpus.sizes.train=300", "model=tiny", "trainer.max_time=null",
        "trainer.max_epochs=3", "module.optimizer.lr=0.01", "module.scheduler.warmup_steps=1",
        "trainer.precision=32-true", "decoding.beam=2", "evaluate.test=false", *QUIET,
    )  # fmt: skip
    assert cfg.trainer.val_check_interval == 500 and cfg.evaluate.validate_every_epoch
    train(cfg)
    assert "Validation every 6 batches, at the end of each epoch" in caplog.text
    assert re.findall(r"validation at step (\d+)", caplog.text) == ["6", "12", "18"]
    assert "(3 validations while training)" in caplog.text
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert set(result["alpha_bleu"]) == {"0.6", "1.0", "1.5", "2.0"}  # tuned: the grid was decoded
    # A run stopped before its first validation leaves last.ckpt only: it translates too.
    translator = Translator.from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert len(translator.translate(["w1 w2 w3", "w4 w5"], beam=2)) == 2


@pytest.mark.parametrize(
    ("interval", "every_epoch", "check_every_n_epochs", "expected"),
    [
        (500, True, None, 500),  # the Bible default's 643 batches an epoch: every 500, as ever
        (1000, True, None, 643),  # longer than an epoch: at each epoch's end
        (1000, False, None, 1000),  # evaluate.validate_every_epoch=false: as given
        (1000, True, 1, 1000),  # Lightning's per-epoch counting: as given
        (None, True, None, None),  # an interval in time ('DD:HH:MM:SS'): Lightning sets no batch count
    ],
)
def test_an_interval_longer_than_an_epoch_becomes_an_epoch(
    interval, every_epoch, check_every_n_epochs, expected
):
    trainer = SimpleNamespace(
        check_val_every_n_epoch=check_every_n_epochs,
        datamodule=SimpleNamespace(train_dataloader=lambda: range(643)),
    )
    if interval is not None:
        trainer.val_check_interval = interval
    FinalValidation(every_epoch=every_epoch).on_fit_start(trainer, None)
    assert getattr(trainer, "val_check_interval", None) == expected


def test_translate_checks_every_path_before_loading_the_model(tmp_path):
    # Not a checkpoint at all: loading it would fail ("Cannot load checkpoint"), so each error below
    # comes before the model loads. (No time bound: a loaded 2-core machine takes 30 s to import torch.)
    fake = tmp_path / "model.ckpt"
    fake.write_bytes(b"")
    source = tmp_path / "in.txt"
    source.write_text("w1\n")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("last.ckpt", "best-step5-bleu1.00.ckpt"):
        (run / "checkpoints" / name).write_bytes(b"")
    cases = [
        ([f"input={tmp_path / 'missing.txt'}"], f"Input file not found: {tmp_path / 'missing.txt'}"),
        ([f"input={tmp_path}"], f"Input file is a directory: {tmp_path}"),
        (
            [f"input={source}", f"ref={tmp_path / 'ref.txt'}"],
            f"Reference file not found: {tmp_path / 'ref.txt'}",
        ),
        ([f"output={tmp_path / 'no' / 'out.txt'}"], f"Output folder not found: {tmp_path / 'no'}"),
    ]
    for overrides, message in cases:
        result = run_script("translate.py", f"ckpt={fake}", *overrides)
        assert (result.returncode, result.stderr) == (2, f"error: {message}\n")
    result = run_script("translate.py", f"ckpt={run}")
    assert result.stderr == (
        f"error: Checkpoint path is a directory: {run}"
        " (checkpoints in it: checkpoints/best-step5-bleu1.00.ckpt, checkpoints/last.ckpt)\n"
    )


@pytest.mark.parametrize(
    ("script", "option", "message"),
    [
        ("translate.py", "+beems=5", "unknown option beems; did you mean beam?"),
        ("translate.py", "beems=5", "unknown option beems; did you mean beam?"),
        (
            "train.py",
            "trainer.max_tme=00:00:01:00",
            "unknown option trainer.max_tme; did you mean trainer.max_time?",
        ),
        ("train.py", "max_time=00:00:01:00", "unknown option max_time; did you mean trainer.max_time?"),
    ],
)
def test_unknown_options_are_errors_that_suggest_the_closest(tmp_path, script, option, message):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"")
    args = [f"ckpt={ckpt}"] if script == "translate.py" else [f"hydra.run.dir={tmp_path / 'run'}"]
    result = run_script(script, *args, option)
    assert (result.returncode, result.stderr) == (2, f"error: {message}\n")
