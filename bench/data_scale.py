"""The data path at scale: prepare time, start-up from the cache, memory per process, loader speed.

    python bench/data_scale.py --pairs 1000000            # about 15 minutes on 2 cores
    python bench/data_scale.py --pairs 10000000           # about 2 hours

Builds a files corpus of ``--pairs`` training pairs (plus 1,000 validation pairs) under ``--work``
(default /tmp/seq2seq_data_scale; never inside the repository) from Bible verses: every ordered pair
of the 31 versions in turn, so sentence lengths and scripts are real ones. Then, each in its own
process so that nothing is shared by accident:

1. first prepare: ``python -m seq2seq.prepare`` into an empty cache (wall time, peak RSS);
2. start-up from the cache, in a fresh process: compose the config, check and open the cache, plan
   the epoch, get the first batch (seconds from process start, imports included, and without them);
3. the DataLoader's batches/s over the epoch's first ``--batches`` batches, with ``data.num_workers``
   0 and 2: from a cold page cache (the cache's pages dropped first, as on a node that has not read
   it since it was written) while the data module's read-ahead fills it, then over as many batches
   once the read-ahead is done; then the peak unique memory (USS) of the process and of each worker
   over as many batches again (sampled every 20 batches);
4. USS of one training process and of each of 2 CPU DDP processes (``train.py`` with ``model=tiny``,
   ``--steps`` steps), measured at the end of training.

USS (private pages, from /proc/PID/smaps) would count pages of the cache mapped into the process
(none are: batches read the ids with pread); each figure is printed with that part and the anonymous
memory. Anonymous memory shared with forked workers is not unique, so USS can be below the anonymous
figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import lightning as L

REPO = Path(__file__).resolve().parents[1]
VALID_PAIRS = 1000


def build_corpus(folder: Path, pairs: int) -> list[str]:
    """Bible verse pairs of every ordered pair of versions in turn; returns the data=files overrides."""
    from seq2seq.data.corpora import bible_db_path

    names = {key: folder / key for key in ("train_src", "train_tgt", "valid_src", "valid_tgt")}
    done = folder / "complete"
    if not done.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(f"file:{bible_db_path()}?mode=ro", uri=True)
        verses: dict[str, dict[tuple[int, int, int], str]] = {}
        for version, book, chapter, verse, text in db.execute(
            "SELECT bbName, bNumber, cNumber, vNumber, vText FROM bible"
        ):
            verses.setdefault(version, {})[book, chapter, verse] = " ".join(text.split())
        db.close()
        versions = sorted(verses)
        streams = {key: path.open("w", encoding="utf-8") for key, path in names.items()}
        written = 0
        for src in versions:
            for tgt in versions:
                if src == tgt or written >= pairs + VALID_PAIRS:
                    continue
                for key in sorted(verses[src].keys() & verses[tgt].keys()):
                    split = "valid" if written < VALID_PAIRS else "train"
                    streams[f"{split}_src"].write(verses[src][key] + "\n")
                    streams[f"{split}_tgt"].write(verses[tgt][key] + "\n")
                    written += 1
                    if written >= pairs + VALID_PAIRS:
                        break
        for stream in streams.values():
            stream.close()
        if written < pairs + VALID_PAIRS:
            raise SystemExit(f"the Bible gives only {written - VALID_PAIRS} training pairs")
        done.touch()
    return ["data=files", *(f"data.corpus.{key}={path}" for key, path in names.items())]


def smaps(pid: int, cache: Path) -> dict[str, float]:
    """USS, its part in pages of the prepared cache, and anonymous memory of ``pid``, in MB."""
    uss = cached = anonymous = 0
    in_cache = False
    with open(f"/proc/{pid}/smaps", encoding="utf-8") as lines:
        for line in lines:
            fields = line.split()
            if not line[0].isupper():  # a mapping's header: address range, ..., path
                in_cache = len(fields) >= 6 and fields[5].startswith(str(cache))
            elif fields[0] in ("Private_Clean:", "Private_Dirty:"):
                uss += int(fields[1])
                cached += int(fields[1]) if in_cache else 0
            elif fields[0] == "Anonymous:":
                anonymous += int(fields[1])
    return {"uss_mb": uss / 1024, "cache_pages_mb": cached / 1024, "anonymous_mb": anonymous / 1024}


class RecordMemory(L.Callback):
    """For train.py runs: writes each process's memory at the end of training to ``path``.rankN."""

    def __init__(self, path: str, cache: str) -> None:
        self.path, self.cache = path, Path(cache)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        record = smaps(os.getpid(), self.cache) | {"steps": trainer.global_step}
        Path(f"{self.path}.rank{trainer.global_rank}").write_text(json.dumps(record))


def evict(folder: Path) -> None:
    """Drop the page-cache pages of the files under ``folder``: reads then go to the disk, as on a node
    that has not read the cache since it was written."""
    for path in folder.rglob("*"):
        if path.is_file():
            descriptor = os.open(path, os.O_RDONLY)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(descriptor)


def measure_loader(overrides: list[str], batches: int, cache: Path) -> None:
    """Runs in its own process: start-up from the cache, then the loader's first ``batches`` batches
    from a cold page cache (while the read-ahead fills it), then as many once the read-ahead is done."""
    import psutil
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import seq2seq  # noqa: F401  (registers decoding/base, which the config composes)

    evict(cache)
    imported = time.time()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["paths.output_dir=/tmp/seq2seq_data_scale/run", *overrides])
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = iter(datamodule.train_dataloader())
    next(loader)
    ready = time.time()
    started = psutil.Process().create_time()

    def batches_per_s() -> float:
        timed = time.perf_counter()
        for _ in range(batches):
            next(loader)
        return batches / (time.perf_counter() - timed)

    cold = batches_per_s()
    if datamodule.reading_ahead is not None:
        datamodule.reading_ahead.join()
    read_ahead_s = time.time() - ready
    warm = batches_per_s()
    # Peak memory of samples taken every 20 batches over as many batches again (not timed).
    children = psutil.Process().children()
    peak = {
        pid: dict.fromkeys(("uss_mb", "cache_pages_mb", "anonymous_mb"), 0.0)
        for pid in [os.getpid(), *(c.pid for c in children)]
    }
    for batch in range(batches):
        next(loader)
        if batch % 20 == 0:
            for pid, record in peak.items():
                for key, value in smaps(pid, cache).items():
                    record[key] = max(record[key], value)
    print(
        json.dumps(
            {
                "startup_s": ready - started,
                "startup_after_imports_s": ready - imported,
                "cold_batches_per_s": cold,
                "read_ahead_done_s": read_ahead_s,
                "warm_batches_per_s": warm,
                "main": peak[os.getpid()],
                "workers": [peak[child.pid] for child in children],
            }
        )
    )


def run(command: list[str]) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run ``command`` from the repository root; returns it, its wall seconds and its peak RSS in GB."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    # This checkout's package first (not an installed one); bench/ for the RecordMemory callback.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "bench"), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # of the largest child so far
    return result, seconds, max(peak, before) / 2**20


def memory_line(name: str, record: dict[str, float]) -> str:
    figures = (record[key] for key in ("uss_mb", "cache_pages_mb", "anonymous_mb"))
    return f"| {name} | " + " | ".join(f"{mb:,.0f}" for mb in figures) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=1_000_000, help="training pairs")
    parser.add_argument("--work", type=Path, default=Path("/tmp/seq2seq_data_scale"), help="corpus and cache")
    parser.add_argument("--batches", type=int, default=1000, help="loader batches timed")
    parser.add_argument("--steps", type=int, default=30, help="training steps of the memory runs")
    parser.add_argument(
        "--keep-cache", action="store_true", help="reuse a prepared cache (no first-prepare time)"
    )
    parser.add_argument("--measure-loader", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cache = args.work / f"cache-{args.pairs}"
    if args.measure_loader is not None:
        measure_loader(args.measure_loader, args.batches, cache)
        return
    if REPO in args.work.resolve().parents:
        raise SystemExit("--work must be outside the repository (the corpus is Bible text)")

    started = time.perf_counter()
    corpus = build_corpus(args.work / f"corpus-{args.pairs}", args.pairs)
    print(f"corpus: {args.pairs:,} training pairs in {args.work / f'corpus-{args.pairs}'}", flush=True)
    print(f"  ({time.perf_counter() - started:.0f} s; load: {os.getloadavg()})", flush=True)
    data = [*corpus, f"paths.cache_dir={cache}"]

    if not args.keep_cache:
        shutil.rmtree(cache, ignore_errors=True)
    result, prepare_s, prepare_rss = run([sys.executable, "-m", "seq2seq.prepare", *data])
    built = "Prepared data in" in result.stderr
    print(
        f"prepare: {prepare_s:.0f} s ({'built' if built else 'reused'}), peak RSS {prepare_rss:.1f} GB",
        flush=True,
    )
    print(
        "  "
        + "\n  ".join(
            line for line in result.stderr.splitlines() if "split" in line or "entencepiece" in line
        )
    )

    loader = {}
    for workers in (0, 2):
        result, _, _ = run(
            [sys.executable, __file__, "--pairs", str(args.pairs), "--work", str(args.work),
             "--batches", str(args.batches), "--measure-loader", *data, f"data.num_workers={workers}"]
        )  # fmt: skip
        loader[workers] = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"loader, {workers} workers: {loader[workers]}", flush=True)

    memory = {}
    for name, strategy in (
        ("single", []),
        ("ddp", ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]),
    ):
        record = args.work / f"memory-{args.pairs}-{name}"
        run_dir = args.work / f"run-{args.pairs}-{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run(
            [sys.executable, "train.py", *data, "model=tiny", *strategy, f"trainer.max_steps={args.steps}",
             f"trainer.val_check_interval={args.steps}", "trainer.limit_val_batches=2", "decoding.beam=1",
             "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}",
             "+callbacks.memory._target_=data_scale.RecordMemory", f"+callbacks.memory.path={record}",
             f"+callbacks.memory.cache={cache}"],
        )  # fmt: skip
        memory[name] = [json.loads(Path(f"{record}.rank{r}").read_text()) for r in range(1 + (name == "ddp"))]
        print(f"train.py {name}: {memory[name]}", flush=True)

    print(f"\n{args.pairs:,} pairs; load average at the end {os.getloadavg()}")
    print(f"first prepare: {prepare_s / 60:.1f} min (peak RSS {prepare_rss:.1f} GB)")
    print(
        f"start-up from the cache: {loader[0]['startup_s']:.1f} s from process start"
        f" ({loader[0]['startup_after_imports_s']:.1f} s after imports), to the first batch"
    )
    for workers, record in loader.items():
        print(
            f"loader, {workers} workers: {record['cold_batches_per_s']:,.0f} batches/s from a cold page"
            f" cache (read-ahead done {record['read_ahead_done_s']:.1f} s after the first batch),"
            f" {record['warm_batches_per_s']:,.0f} after"
        )
    print("\n| process | USS MB | of which cache pages | anonymous MB |\n| --- | --- | --- | --- |")
    print(memory_line("loader only, 0 workers", loader[0]["main"]))
    print(memory_line("loader only, main of 2 workers", loader[2]["main"]))
    for i, worker in enumerate(loader[2]["workers"]):
        print(memory_line(f"loader only, worker {i}", worker))
    print(memory_line("train.py, 1 process", memory["single"][0]))
    for rank, record in enumerate(memory["ddp"]):
        print(memory_line(f"train.py DDP rank {rank}", record))


if __name__ == "__main__":
    main()
