"""BLEU by source length: where in the length range one system beats another.

    python -m seq2seq.length_buckets --src test.src --ref test.ref \
        --hyp context=ctx/test.hyp --hyp attention=attn/test.hyp --out results/length

Splits the test sentences into buckets by source length in words and scores each system's
translations of each bucket with sacrebleu. Writes ``length_bleu.md`` (a table: one row per bucket
with its sentence count, one column per system) and ``length_bleu.png`` (BLEU against source length,
one line per system; needs matplotlib, ``pip install -e '.[plot]'``), and prints the table.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from seq2seq.cli import run_cli
from seq2seq.data.text import read_lines
from seq2seq.errors import UserError
from seq2seq.metrics import corpus_scores

DEFAULT_EDGES = (10, 20, 30, 40, 50)  # bucket upper bounds in source words; the last bucket is open


def bucket_names(edges: Sequence[int]) -> list[str]:
    lows = [1, *(edge + 1 for edge in edges)]
    return [f"{low}-{high}" for low, high in zip(lows, edges, strict=False)] + [f"{edges[-1] + 1}+"]


def bucket_of(length: int, edges: Sequence[int]) -> int:
    return next((i for i, edge in enumerate(edges) if length <= edge), len(edges))


def bleu_by_length(
    sources: list[str],
    references: list[str],
    systems: dict[str, list[str]],
    edges: Sequence[int] = DEFAULT_EDGES,
) -> list[dict[str, object]]:
    """One row per non-empty bucket: ``bucket``, ``sentences`` and the corpus BLEU of each system."""
    for name, hypotheses in systems.items():
        if len(hypotheses) != len(references):
            raise UserError(f"system {name!r} has {len(hypotheses)} lines, the references {len(references)}")
    if len(sources) != len(references):
        raise UserError(f"{len(sources)} source lines but {len(references)} reference lines")
    members: list[list[int]] = [[] for _ in range(len(edges) + 1)]
    for i, source in enumerate(sources):
        members[bucket_of(len(source.split()), edges)].append(i)
    rows = []
    for name, indices in zip(bucket_names(edges), members, strict=True):
        if not indices:
            continue
        row: dict[str, object] = {"bucket": name, "sentences": len(indices)}
        for system, hypotheses in systems.items():
            scores = corpus_scores([hypotheses[i] for i in indices], [references[i] for i in indices])
            row[system] = round(scores.bleu, 2)
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, object]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, object]], systems: Sequence[str], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("The plot needs matplotlib: pip install -e '.[plot]'") from None
    figure, axes = plt.subplots(figsize=(7, 4))
    labels = [f"{row['bucket']}\n({row['sentences']})" for row in rows]
    for system in systems:
        axes.plot(labels, [row[system] for row in rows], marker="o", label=system)
    axes.set_xlabel("source length in words (sentences)")
    axes.set_ylabel("BLEU")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--src", required=True, help="source sentences, one per line")
    parser.add_argument("--ref", required=True, help="reference translations")
    parser.add_argument("--hyp", required=True, action="append", help="NAME=FILE, once per system")
    parser.add_argument("--out", required=True, help="folder for length_bleu.md and length_bleu.png")
    parser.add_argument("--edges", type=int, nargs="+", default=list(DEFAULT_EDGES), help="bucket bounds")
    args = parser.parse_args()
    systems = {}
    for item in args.hyp:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--hyp {item!r}: expected NAME=FILE")
        systems[name] = read_lines(path)
    rows = bleu_by_length(read_lines(args.src), read_lines(args.ref), systems, args.edges)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    (out / "length_bleu.md").write_text(table, encoding="utf-8")
    plot(rows, list(systems), out / "length_bleu.png")
    print(table + f"\nWrote {out / 'length_bleu.md'} and {out / 'length_bleu.png'}")


if __name__ == "__main__":
    run_cli(main)
