"""Issue 24's measurement: one recipe setting at a time against today's default, at the default's budget,
on Bible pairs, two runs side by side on one core each (``taskset``, one thread each), nothing else on
the machine. Resumable: a finished run (result.json "ok" and its greedy translation) is skipped, an
unfinished one resumes from its last.ckpt (``trainer.max_time`` counts the whole run across resumes),
so a long queue can be run in pieces, stopped and started again with the same command.

    python bench/recipe_ablation.py --pairs e-k,9-4 --settings default,linear,ema,unidirectional
    python bench/recipe_ablation.py --pairs e-k,9-4 --settings ... --report   # the table only
    python bench/recipe_ablation.py --sweep sweeps/bible_recipe_hyperband --settings default,sweep_best

Every run is ``python train.py data.corpus.src_version=SRC data.corpus.tgt_version=TGT`` plus its
setting's overrides (SETTINGS below; ``a+b`` combines two settings); ``plain_loop`` is
bench/plain_loop.py for the same minutes. Each of our runs is scored as train.py scores it (beam 5,
alpha tuned on the validation split) and also greedy (translate.py beam=1), on the same test split.
The table says which setting beat the first of ``--settings`` (``default``, or e.g. ``attn_bahdanau``
against a search's ``sweep_best``) on validation BLEU (what decides; greedy, as training validates, and
beam 5 with the tuned alpha) and shows the test scores beside it; results.md in OUT holds it too.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

from runs import best_checkpoint, data_overrides, train_command, trained

from seq2seq.data.corpora import BIBLE_LANGUAGES
from seq2seq.data.text import read_lines
from seq2seq.metrics import corpus_scores

# the recipe's values before the Hyperband search chose new ones (the learning rate aside)
RECIPE_BEFORE_SEARCH = [
    "module.label_smoothing=0.1",
    "model.dropout=0.1",
    "model.embed_size=256",
    "data.batch_tokens=3000",
    "data.subword.vocab_size=8000",
    "evaluate.validate_every_epoch=false",  # every 500 batches, as then: its epochs have 422 on the Bible
]
# One change to today's default each (issue 24, item 5), or an earlier default to measure today's against;
# "plain_loop" is the yardstick of item 6.
SETTINGS: dict[str, list[str]] = {
    "default": [],
    # the default until the successive-halving search's recipe replaced it (docs/recipe-search.md)
    "before_halving": [
        "module.optimizer.lr=0.0027",
        "module.label_smoothing=0.14",
        "model.dropout=0.05",
        "model.embed_size=256",
    ],
    # the default until the Hyperband search's recipe replaced it
    "before_hyperband": ["module.optimizer.lr=0.004", *RECIPE_BEFORE_SEARCH],
    # the default when issue 24 (training for a budget) was filed: its target is measured against this
    "before_issue_24": ["module.optimizer.lr=0.002", *RECIPE_BEFORE_SEARCH],
    "linear": ["module.scheduler.name=linear"],  # decay to zero at the end of the budget
    "cosine": ["module.scheduler.name=cosine"],
    "ema": ["module.ema_decay=0.999"],
    # at this budget's few hundred steps the default is far from converged: the step size matters most
    # (0.002 was the default before 0.004 beat it; 0.0027 and 0.0032 came with the searches' recipes)
    "lr_0.002": ["module.optimizer.lr=0.002"],
    "lr_0.006": ["module.optimizer.lr=0.006"],
    # the one-direction encoder reading the source reversed (experiment=ctx_reversed)
    "unidirectional": ["model.bidirectional=false", "model.bridge=false", "model.reverse_source=true"],
    "subword_sampling": ["data.subword_sampling={alpha:0.5,nbest:-1}"],  # 1.02x the tokens (docs/training.md)
    # the README's model variants (docs/benchmarks.md): "default" is the bidirectional context vector,
    # "unidirectional" the reversed one
    "context_vector": ["experiment=ctx_plain"],
    "attn_bahdanau": ["experiment=attn_bahdanau"],
    "attn_luong": ["experiment=attn_luong"],
    "plain_loop": [],
}


def best_of_sweep(sweep_dir: Path) -> list[str]:
    """The train.py overrides of the best complete trial of the study that ``sweep_dir`` holds (its
    multirun.yaml names the study and where it is stored)."""
    import optuna
    from omegaconf import OmegaConf

    from seq2seq.sweeper.space import trial_overrides
    from seq2seq.trial import StudySpec

    spec = StudySpec.of(OmegaConf.load(sweep_dir / "multirun.yaml").hydra.sweeper, sweep_dir)
    study = optuna.load_study(study_name=spec.name, storage=spec.open_storage())
    return trial_overrides([], study.best_trial.params)


def add_sweep_best(out: Path, sweep_dir: Path) -> list[str]:
    """Register the setting ``sweep_best``: the best trial of ``sweep_dir``'s study, chosen once and kept in
    ``out/sweep_best.json``, so that a resumed queue trains what it started although the study went on."""
    record = out / "sweep_best.json"
    if record.exists():
        overrides = json.loads(record.read_text())["overrides"]
    else:
        overrides = best_of_sweep(sweep_dir)
        out.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"sweep": str(sweep_dir), "overrides": overrides}, indent=1) + "\n")
    SETTINGS["sweep_best"] = overrides
    return overrides


def setting_overrides(setting: str) -> list[str]:
    """A setting's train.py overrides; "a+b" combines settings a and b (a winner of each, together)."""
    return [override for part in setting.split("+") for override in SETTINGS[part]]


def data_choices(settings: list[str], overrides: list[str]) -> list[tuple[str, ...]]:
    """The distinct ``data.*`` overrides of the train.py settings (a sweep's best trial may choose its own
    subwords): one prepared cache each."""
    return sorted(
        {
            tuple(data_overrides([*overrides, *setting_overrides(setting)]))
            for setting in settings
            if setting != "plain_loop"
        }
    )


def run_folder(out: Path, pair: str, setting: str) -> Path:
    return out / pair / setting


def finished(folder: Path, setting: str) -> bool:
    if setting == "plain_loop":
        return (folder / "plain.json").exists()
    return trained(folder) and (folder / "greedy.test.hyp").exists()


def training_command(
    folder: Path, pair: str, setting: str, minutes: float, overrides: list[str]
) -> list[str] | None:
    """The run's training command (a resumed run continues from its last.ckpt); None when trained."""
    src, tgt = pair.split("-")
    if setting == "plain_loop":
        return [
            sys.executable, "bench/plain_loop.py", "--src", src, "--tgt", tgt, "--minutes", str(minutes),
            "--result", str(folder / "plain.json"),
        ]  # fmt: skip
    if trained(folder):
        return None
    pair_overrides = [f"data.corpus.src_version={src}", f"data.corpus.tgt_version={tgt}"]
    return train_command(folder, minutes, [*pair_overrides, *overrides, *setting_overrides(setting)])


def greedy_command(folder: Path) -> list[str]:
    """Greedy decoding of the test split with the run's best checkpoint."""
    return [
        sys.executable, "translate.py", f"ckpt={best_checkpoint(folder)}", f"input={folder / 'test.src'}",
        f"output={folder / 'greedy.test.hyp'}", "beam=1", "progress=false",
    ]  # fmt: skip


def worker(core: int, jobs: queue.Queue, args: argparse.Namespace, failures: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def call(command: list[str], folder: Path) -> bool:
        with open(folder / "run.log", "a") as log:
            code = subprocess.call(["taskset", "-c", str(core), *command], stdout=log, stderr=log, env=env)
        if code != 0:
            failures.append(f"{folder}: exit {code}, see {folder / 'run.log'}")
        return code == 0

    while True:
        try:
            pair, setting = jobs.get_nowait()
        except queue.Empty:
            return
        folder = run_folder(args.out, pair, setting)
        folder.mkdir(parents=True, exist_ok=True)
        print(f"core {core}: {pair} {setting}", flush=True)
        train = training_command(folder, pair, setting, args.minutes, args.override)
        if (train is None or call(train, folder)) and setting != "plain_loop":
            call(greedy_command(folder), folder)
        print(f"core {core}: {pair} {setting} ended", flush=True)


def report(out: Path, pairs: list[str], settings: list[str]) -> str:
    """The table of each pair's finished runs; "vs" compares validation BLEU with the first setting's."""
    reference = settings[0]
    lines = []
    for pair in pairs:
        lines += [
            f"\n### {pair}\n",
            f"| setting | steps | target tokens/s | best val BLEU (greedy) | vs {reference}"
            " | val BLEU (beam 5, alpha) | test BLEU (beam 5) | test BLEU (greedy) | test chrF (beam 5) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        reference_val = None
        tgt_lang = BIBLE_LANGUAGES.get(pair.split("-")[1])  # BLEU's tokenizer, as train.py chose it
        for setting in settings:
            folder = run_folder(out, pair, setting)
            if not finished(folder, setting):
                lines.append(f"| {setting} | not finished | | | | | | | |")
                continue
            if setting == "plain_loop":
                plain = json.loads((folder / "plain.json").read_text())
                lines.append(
                    f"| plain loop | {plain['steps']:,} | {plain['tokens_per_second']:,.0f} | - | - | - | -"
                    f" | {plain['test_bleu_greedy']:.2f} | - |"
                )
                continue
            result = json.loads((folder / "result.json").read_text())
            refs = read_lines(folder / "test.ref")
            beam = corpus_scores(read_lines(folder / "test.hyp"), refs, tgt_lang)
            greedy = corpus_scores(read_lines(folder / "greedy.test.hyp"), refs, tgt_lang)
            if setting == reference:
                reference_val = result["val_bleu"]
            # the length penalty's choice on the validation split (absent when it was not tuned)
            tuned = result.get("alpha_bleu") or {}
            beam_valid = f"{max(tuned.values()):.2f} ({result['alpha']:g})" if result.get("alpha") else "-"
            delta = "-" if reference_val is None else f"{result['val_bleu'] - reference_val:+.2f}"
            lines.append(
                f"| {setting} | {result['steps']:,} | {result['tokens_per_second']:,.0f}"
                f" | {result['val_bleu']:.2f} | {delta} | {beam_valid} | {beam.bleu:.2f} | {greedy.bleu:.2f}"
                f" | {beam.chrf:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", default="e-k,9-4", help="Bible SRC-TGT versions, comma-separated")
    parser.add_argument(
        "--settings",
        default="default,linear,ema,unidirectional",
        help=f"of {list(SETTINGS)}; a+b combines two",
    )
    parser.add_argument("--minutes", type=float, default=28.0)
    parser.add_argument("--cores", default="0,1", help="one run per core")
    parser.add_argument("--out", type=Path, default=Path("outputs/recipe_ablation"))
    parser.add_argument(
        "--override", action="append", default=[], help="for every train.py run (data.* also for prepare)"
    )
    parser.add_argument("--report", action="store_true", help="print the table of what has finished")
    parser.add_argument(
        "--sweep", type=Path, help="a sweep folder: its best trial becomes the setting sweep_best"
    )
    args = parser.parse_args()
    if args.sweep or (args.out / "sweep_best.json").exists():
        print("sweep_best:", " ".join(add_sweep_best(args.out, args.sweep)), flush=True)
    pairs, settings = args.pairs.split(","), args.settings.split(",")
    parts = {part for setting in settings for part in setting.split("+")}
    if unknown := parts - set(SETTINGS):
        parser.error(f"--settings: unknown {sorted(unknown)}; known: {list(SETTINGS)}")
    if any("+" in setting and "plain_loop" in setting.split("+") for setting in settings):
        parser.error("--settings: plain_loop is not a train.py setting and combines with nothing")
    if not args.report:
        for pair in pairs:  # the prepared data first, so that no timed run builds it beside another's
            src, tgt = pair.split("-")
            for data_choice in data_choices(settings, args.override):
                subprocess.run(
                    [sys.executable, "-m", "seq2seq.prepare", f"data.corpus.src_version={src}",
                     f"data.corpus.tgt_version={tgt}", *data_choice],
                    check=True, stdout=subprocess.DEVNULL,
                )  # fmt: skip
        jobs: queue.Queue = queue.Queue()
        for pair in pairs:
            for setting in settings:
                if not finished(run_folder(args.out, pair, setting), setting):
                    jobs.put((pair, setting))
        failures: list[str] = []
        threads = [
            threading.Thread(target=worker, args=(int(core), jobs, args, failures))
            for core in args.cores.split(",")
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            sys.exit("\n".join(failures))
    text = report(args.out, pairs, settings)
    (args.out / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
