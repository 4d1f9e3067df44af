"""BLEU by source-length bucket: the table and the plot."""

from __future__ import annotations

import subprocess
import sys

import pytest

from seq2seq.length_buckets import bleu_by_length, bucket_names
from tests.test_training import REPO


def corpus() -> tuple[list[str], list[str]]:
    sources = [" ".join(["w"] * n) for n in (3, 5, 15, 18, 60)]
    references = [f"the reference number {i} is here" for i in range(5)]
    return sources, references


def test_each_bucket_scores_each_system():
    sources, references = corpus()
    wrong = ["nothing alike at all"] * 5
    half = references[:2] + wrong[2:]  # right on the short sentences only
    rows = bleu_by_length(sources, references, {"right": references, "half": half, "wrong": wrong})
    assert [row["bucket"] for row in rows] == ["1-10", "11-20", "51+"]  # empty buckets are left out
    assert [row["sentences"] for row in rows] == [2, 2, 1]
    assert [row["right"] for row in rows] == [100.0, 100.0, 100.0]
    assert rows[0]["half"] == 100.0 and rows[1]["half"] < 1
    assert bucket_names([10, 20]) == ["1-10", "11-20", "21+"]


def test_a_system_with_missing_lines_is_named():
    sources, references = corpus()
    with pytest.raises(ValueError, match="system 'short' has 4 lines, the references 5"):
        bleu_by_length(sources, references, {"short": references[:4]})


def test_command_writes_table_and_png(tmp_path):
    sources, references = corpus()
    for name, lines in (("src", sources), ("ref", references), ("hyp", references)):
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "seq2seq.length_buckets", f"--src={tmp_path / 'src'}",
         f"--ref={tmp_path / 'ref'}", f"--hyp=model={tmp_path / 'hyp'}", f"--out={tmp_path / 'out'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "length_bleu.md").read_text().startswith("| bucket | sentences | model |")
    assert (tmp_path / "out" / "length_bleu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
