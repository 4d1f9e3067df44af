"""The results table of ``bench/quality.sh``: every system's test scores, training speed and size.

    python bench/quality_table.py OUT_DIR

Reads what ``bench/quality.sh`` left in OUT_DIR: each of our runs (``runs/<experiment>/``: result.json,
logs/metrics.csv, test.ref and the test translations), the averaged and ensembled translations, and
Joey NMT's folder (``joey/``: its training log and test translations). Every BLEU and chrF is computed
here, by the same sacrebleu call, against the same reference file. Prints a Markdown table and writes it
to OUT_DIR/results.md.
"""

from __future__ import annotations

import csv
import json
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from seq2seq.data.text import read_lines
from seq2seq.metrics import corpus_scores

VARIANTS = {
    "ctx_plain": "context vector (Sutskever et al.)",
    "ctx_reversed": "+ source reversal",
    "ctx_bidirectional": "+ bidirectional encoder, bridge",
    "attn_bahdanau": "+ Bahdanau attention, input feeding",
    "attn_luong": "+ Luong (general) attention, input feeding",
}
ATTENTION_RUNS = ("attn_bahdanau", "attn_luong")  # also decoded greedy and averaged by bench/quality.sh
THROUGHPUT_COLUMN = "train/device/items_per_sec"  # target tokens/s over the last 10 steps


@dataclass
class Training:
    """How a system was trained: steps, mean target tokens/s, minutes, parameters, best validation BLEU."""

    steps: int
    tokens_per_s: float
    minutes: float
    parameters: int
    val_bleu: float


@dataclass
class Row:
    system: str
    decoding: str
    hypotheses: Path
    training: Training | None  # None: made from other rows' models (an ensemble)


def our_training(run: Path) -> Training:
    result = json.loads((run / "result.json").read_text(encoding="utf-8"))
    if result["status"] != "ok":
        raise ValueError(f"{run}: the run failed ({result.get('error')})")
    with open(next(run.glob("logs/**/metrics.csv")), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rates = [float(r[THROUGHPUT_COLUMN]) for r in rows if r.get(THROUGHPUT_COLUMN)]
    steps = max(int(r["step"]) for r in rows) + 1  # rows are logged with the step count before the update
    return Training(
        steps, statistics.mean(rates), result["train_minutes"], result["parameters"], result["val_bleu"]
    )


def joey_training(folder: Path) -> Training:
    """Joey's own figures, from its training log (its tokens/s are target tokens over 10 steps, too)."""
    log = (folder / "model" / "train.log").read_text(encoding="utf-8")
    rates = [float(r) for r in re.findall(r"Tokens per Sec:\s*([\d.]+)", log)]
    steps = int(re.findall(r"(?:Step:|step) *(\d+)", log)[-1])  # "Interrupt at epoch 1, step N." last
    parameters = int(re.search(r"Total params: (\d+)", log).group(1))
    minutes = float(re.search(r"training ran ([\d.]+) minutes", (folder / "train.out").read_text()).group(1))
    report = folder / "model" / "validations.txt"
    scores = re.findall(r"bleu:\s*([\d.]+)", report.read_text()) if report.exists() else []
    return Training(
        steps, statistics.mean(rates), minutes, parameters, max(map(float, scores), default=float("nan"))
    )


def collect_rows(out: Path) -> list[Row]:
    runs = out / "runs"
    training = {run: our_training(runs / run) for run in VARIANTS}  # each run's files read once
    rows = [Row(name, "beam 5", runs / run / "test.hyp", training[run]) for run, name in VARIANTS.items()]
    for run in ATTENTION_RUNS:
        if (hyp := runs / run / "greedy.test.hyp").exists():
            rows.append(Row(VARIANTS[run].removeprefix("+ "), "greedy", hyp, training[run]))
    for run in ATTENTION_RUNS:
        if (hyp := runs / run / "averaged.test.hyp").exists():
            name = f"{VARIANTS[run].removeprefix('+ ').split(',')[0]}, last 4 checkpoints averaged"
            rows.append(Row(name, "beam 5", hyp, training[run]))
    if (hyp := out / "ensemble.test.hyp").exists():
        rows.append(Row("ensemble of the Bahdanau and Luong runs", "beam 5", hyp, None))
    joey = joey_training(out / "joey")
    for hyp in sorted((out / "joey").glob("test.beam*.hyp")):
        beam = int(hyp.name.removeprefix("test.beam").removesuffix(".hyp"))
        rows.append(
            Row("Joey NMT 2.3 RNN, Bahdanau attention", "greedy" if beam == 1 else f"beam {beam}", hyp, joey)
        )
    return rows


def table(rows: list[Row], references: list[str]) -> str:
    lines = [
        "| system | decoding | test BLEU | test chrF | best val BLEU (greedy) | minutes | steps"
        " | target tokens/s | parameters |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        scores = corpus_scores(read_lines(row.hypotheses), references)
        t = row.training
        trained = (
            f"{t.val_bleu:.2f} | {t.minutes:.1f} | {t.steps:,} | {t.tokens_per_s:,.0f}"
            f" | {t.parameters / 1e6:.1f} M"
            if t
            else "- | 2 runs | - | - | -"
        )
        lines.append(f"| {row.system} | {row.decoding} | {scores.bleu:.2f} | {scores.chrf:.2f} | {trained} |")
    lines.append(f"\n{scores.bleu_signature}; {scores.chrf_signature}")
    return "\n".join(lines)


def main(out: Path) -> None:
    references = read_lines(out / "runs" / "ctx_plain" / "test.ref")
    text = table(collect_rows(out), references)
    (out / "results.md").write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
