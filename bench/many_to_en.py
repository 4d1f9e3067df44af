"""Issue 25's measurement: one many-to-English Bible model (``experiment=bible_many_to_en``, 27 languages,
831,654 pairs) against bilingual models of the same size and budget, on this machine.

    python bench/many_to_en.py --languages 5 --bilingual-run e=outputs/recipe_s4/e-k/default
    python bench/many_to_en.py --languages 5 --override model.attention=bahdanau \
        --many-override data.subword.vocab_size=8000 --bilingual-run e=sweeps/attn_recipe_halving/0

``--override`` goes to every model trained here (a recipe: both kinds get it), ``--many-override`` to
the many-to-English model alone (its joint vocabulary's size); their ``data.*`` keys also choose the
prepared caches.

1. Prepares the many-to-English data alone (sentencepiece on all 27 languages, then the ids), timed,
   with its peak memory (``/usr/bin/time``).
2. Trains the many-to-English model on core 0 and, side by side on core 1, a bilingual model of the
   default (``data.corpus.src_version=X``) for each of ``--languages``, the same minutes each, one
   thread each, with peak memory. ``--bilingual-run X=FOLDER`` takes a bilingual X-k run made the same
   way earlier (bench/recipe_ablation.py's ``default``) instead of training one.
3. Scores the many-to-English model and each bilingual model on the many-to-English test verses of
   the bilingual model's language with translate.py (beam 5, each run's tuned alpha, or 1 where it had
   too few validations to tune one), so both are scored on the same verses in the same way. Those
   verses are held out of both models' training (the hold-out is one seeded permutation of the verses:
   the many-to-English test is its positions 100-300, the bilingual hold-out its first 2,000), but they
   lie in the bilingual model's validation split (positions 0-1,000), which chose its checkpoint and
   alpha: the table says so.

Resumable: what has finished is skipped, an unfinished training run resumes from its last.ckpt.
Nothing else should run on the machine. results.md in OUT holds the table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf
from runs import best_checkpoint, data_overrides, train_command, trained

from seq2seq.data.corpora import BIBLE_LANGUAGES, load_bible
from seq2seq.data.text import read_lines
from seq2seq.metrics import corpus_scores

TARGET = "k"  # the many-to-English model's target: KJV


def peak_memory_gib(time_file: Path) -> float:
    """The peak resident memory that ``/usr/bin/time -v`` wrote to ``time_file``, in GiB (the largest of
    its reports: a resumed run appends one)."""
    kbytes = re.findall(r"Maximum resident set size \(kbytes\): (\d+)", time_file.read_text())
    return max(map(int, kbytes)) / 2**20


def timed_train_command(folder: Path, minutes: float, overrides: list[str]) -> list[str]:
    """runs.train_command under ``/usr/bin/time``, which appends its report to ``folder/time.txt``."""
    timed = ["/usr/bin/time", "-v", "-a", "-o", str(folder / "time.txt")]
    return [*timed, *train_command(folder, minutes, overrides)]


def run_logged(command: list[str], log: Path, core: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pinned = ["taskset", "-c", str(core), *command] if core is not None else command
    with open(log, "a") as out:
        return subprocess.Popen(pinned, stdout=out, stderr=out, env=env)


def prepare_command(overrides: list[str], log: Path) -> str:
    """``python -m seq2seq.prepare`` (under ``/usr/bin/time``, which writes beside ``log``); the cache."""
    command = ["/usr/bin/time", "-v", "-o", str(log.with_suffix(".time.txt")), sys.executable, "-m",
               "seq2seq.prepare", *overrides]  # fmt: skip
    with open(log, "a") as err:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=err, text=True)
    if done.returncode != 0:
        sys.exit(f"prepare failed: see {log}")
    return done.stdout.strip().splitlines()[-1]


def pair_overrides(src: str) -> list[str]:
    """The Bible pair of the bilingual model from ``src`` into the target."""
    return [f"data.corpus.src_version={src}", f"data.corpus.tgt_version={TARGET}"]


def prepare(out: Path, languages: list[str], overrides: list[str], many_overrides: list[str]) -> dict:
    """The many-to-English cache, built alone and timed (reused when built before: then from its run);
    the bilingual ones too, so that no timed run builds one beside another."""
    for src in languages:
        prepare_command(
            [*pair_overrides(src), *data_overrides(overrides)], out / f"prepare-{src}-{TARGET}.log"
        )
    record = out / "prepare.json"
    if record.exists():
        return json.loads(record.read_text())
    start = time.perf_counter()
    many = ["experiment=bible_many_to_en", *data_overrides([*overrides, *many_overrides])]
    cache = Path(prepare_command(many, out / "prepare.log"))
    manifest = json.loads((cache / "manifest.json").read_text())
    fields = {
        "seconds": time.perf_counter() - start,
        "peak_gib": peak_memory_gib(out / "prepare.time.txt"),
        "cache": str(cache),
        "cache_mib": sum(f.stat().st_size for f in cache.iterdir()) / 2**20,
        "train_pairs": manifest["splits"]["train"]["kept"],
        "manifest_seconds": manifest["seconds"],
    }
    record.write_text(json.dumps(fields, indent=1))
    return fields


def train_side_by_side(
    out: Path, languages: list[str], minutes: float, overrides: list[str], many_overrides: list[str]
) -> None:
    """The many-to-English model on core 0; the bilingual models one after another on core 1."""
    many = out / "many"
    many.mkdir(parents=True, exist_ok=True)
    jobs = []
    if not trained(many):
        # no test decoding in the run: this script scores both kinds of model on the same verses
        many_run = ["experiment=bible_many_to_en", "evaluate.test=false", *overrides, *many_overrides]
        command = timed_train_command(many, minutes, many_run)
        jobs.append((many, run_logged(command, many / "run.log", core=0)))
    for src in languages:
        folder = out / f"{src}-{TARGET}"
        folder.mkdir(parents=True, exist_ok=True)
        if trained(folder):
            continue
        command = timed_train_command(folder, minutes, [*pair_overrides(src), *overrides])
        process = run_logged(command, folder / "run.log", core=1)
        if process.wait() != 0:
            sys.exit(f"{folder}: training failed, see {folder / 'run.log'}")
    for folder, process in jobs:
        if process.wait() != 0:
            sys.exit(f"{folder}: training failed, see {folder / 'run.log'}")


def score_on_many_test(run: Path, src: str, many: Path) -> dict:
    """Beam-5 BLEU of a run's best checkpoint (its alpha: tuned, or 1 untuned) on the many-to-English
    test verses of ``src``, translated by translate.py."""
    hypotheses = run / f"many_test.{src}.hyp"
    corpus_cfg = OmegaConf.load(many / "config_resolved.yaml").data.corpus
    test = load_bible(
        src, TARGET, corpus_cfg.valid_size, corpus_cfg.test_size, corpus_cfg.seed, train_size=1
    ).test
    if not hypotheses.exists():
        source = run / f"many_test.{src}.src"
        source.write_text("".join(line + "\n" for line in test.src), encoding="utf-8")
        command = [sys.executable, "translate.py", f"ckpt={best_checkpoint(run)}", f"input={source}",
                   f"output={hypotheses}", "beam=5", "progress=false"]  # fmt: skip
        if run_logged(command, run / "run.log", core=1).wait() != 0:
            sys.exit(f"{run}: translate failed, see {run / 'run.log'}")
    scores = corpus_scores(read_lines(hypotheses), test.tgt, BIBLE_LANGUAGES[TARGET])
    return {"bleu": scores.bleu, "chrf": scores.chrf, "verses": len(test.tgt)}


def report(out: Path, bilingual: dict[str, Path], prep: dict) -> str:
    lines = [
        f"Prepare (alone): {prep['train_pairs']:,} training pairs in {prep['seconds'] / 60:.1f} min"
        f" (sentencepiece {prep['manifest_seconds']['sentencepiece'] / 60:.1f} min), peak memory"
        f" {prep['peak_gib']:.2f} GiB, cache {prep['cache_mib']:.0f} MiB.",
        "",
        "| model | steps | target tokens/s | peak memory (GiB) | val BLEU (greedy) |",
        "|---|---:|---:|---:|---:|",
    ]
    runs = {"many-to-English": out / "many", **{f"{s}-{TARGET} bilingual": f for s, f in bilingual.items()}}
    for name, folder in runs.items():
        result = json.loads((folder / "result.json").read_text())
        memory = f"{peak_memory_gib(folder / 'time.txt'):.2f}" if (folder / "time.txt").exists() else "-"
        # a run whose own scoring failed has no figures in result.json: its train.log has them
        steps = f"{result['steps']:,}" if "steps" in result else "-"
        rate = f"{result['tokens_per_second']:,.0f}" if "tokens_per_second" in result else "-"
        val_bleu = f"{result['val_bleu']:.2f}" if "val_bleu" in result else "-"
        lines.append(f"| {name} | {steps} | {rate} | {memory} | {val_bleu} |")
    lines += [
        "",
        "Test BLEU (beam 5) on the same verses, the many-to-English test of each language; the bilingual",
        "model's validation split holds these verses (they chose its checkpoint and alpha).",
        "",
        "| source language | many-to-English | bilingual | difference |",
        "|---|---:|---:|---:|",
    ]
    for src, folder in bilingual.items():
        ours = score_on_many_test(out / "many", src, out / "many")["bleu"]
        theirs = score_on_many_test(folder, src, out / "many")
        lines.append(
            f"| {BIBLE_LANGUAGES[src]} ({src}, {theirs['verses']} verses) | {ours:.2f} | {theirs['bleu']:.2f}"
            f" | {ours - theirs['bleu']:+.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--languages", default="5", help="bilingual X-k models to train, comma-separated")
    parser.add_argument(
        "--bilingual-run", action="append", default=[], metavar="X=FOLDER",
        help="a bilingual X-k train.py run made earlier on this machine, side by side (repeatable)",
    )  # fmt: skip
    parser.add_argument("--minutes", type=float, default=28.0)
    parser.add_argument("--override", action="append", default=[], help="for every model trained here")
    parser.add_argument(
        "--many-override", action="append", default=[], help="for the many-to-English model alone"
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/many_to_en"))
    parser.add_argument("--score-only", action="store_true", help="train nothing: score and report the runs")
    args = parser.parse_args()
    languages = [src for src in args.languages.split(",") if src]
    earlier = dict(run.split("=", 1) for run in args.bilingual_run)
    bilingual = {src: Path(folder) for src, folder in earlier.items()}
    bilingual |= {src: args.out / f"{src}-{TARGET}" for src in languages}
    for src, folder in earlier.items():
        if not trained(Path(folder)):
            parser.error(f"--bilingual-run {src}={folder}: no finished train.py run (result.json) there")
    args.out.mkdir(parents=True, exist_ok=True)
    prep = json.loads((args.out / "prepare.json").read_text()) if args.score_only else None
    if not args.score_only:
        prep = prepare(args.out, languages, args.override, args.many_override)
        train_side_by_side(args.out, languages, args.minutes, args.override, args.many_override)
    text = report(args.out, bilingual, prep)
    (args.out / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
