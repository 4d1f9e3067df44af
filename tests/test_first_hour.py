"""What a new user trips over in the first hour: time budgets across resumes, short runs, early and
helpful errors from the command line."""

from __future__ import annotations

import logging
import re
from datetime import timedelta

import pytest
import torch

from seq2seq.training import train
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
