"""The prepared data cache: equal to in-memory encoding, reused, rebuilt on change, never left half
written, built once under DDP; DataLoader workers."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from seq2seq.data.corpora import ParallelFiles
from seq2seq.data.encoded import EncodedSplit
from seq2seq.data.prepared import cache as cache_module
from seq2seq.data.prepared.cache import stale_reason
from seq2seq.data.prepared.format import RaggedIds
from seq2seq.data.prepared.read_ahead import read_ahead
from seq2seq.tokenization import LineSample
from tests.test_training import QUIET, REPO, run_script


def write(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def toy_files(folder: Path, pairs: int = 400) -> list[str]:
    """A files corpus (training, validation) with some pairs to drop; returns the data=files overrides."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(30)]
    src = [" ".join(rng.choice(words, size=rng.integers(1, 12))) for _ in range(pairs)]
    src[3], src[10] = "", " ".join(["w1"] * 40)  # an empty pair and one longer than max_len
    tgt = [" ".join(reversed(line.split())) for line in src]
    names = {"train_src": src, "train_tgt": tgt, "valid_src": src[:30], "valid_tgt": tgt[:30]}
    return [f"data.corpus.{key}={write(folder / key, lines)}" for key, lines in names.items()]


FILES = ["data=files", "data.subword.vocab_size=40", "data.subword.model_type=word", "data.max_len=20"]


def files_datamodule(compose_config, corpus: list[str], *overrides: str):
    datamodule = instantiate(compose_config(*FILES, *corpus, *overrides).data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def prepared_folder(tmp_path: Path) -> Path:
    (folder,) = [p for p in (tmp_path / "cache" / "prepared").iterdir() if p.is_dir()]
    return folder


@pytest.mark.parametrize("data", ["toy", "files"])
def test_prepared_ids_equal_the_in_memory_encoding(tmp_path, compose_config, data):
    corpus = toy_files(tmp_path) if data == "files" else []
    datamodule = files_datamodule(compose_config, corpus) if data == "files" else None
    if datamodule is None:
        datamodule = instantiate(compose_config("data=toy").data)
        datamodule.setup("fit")
    raw = datamodule.load_corpus()
    tokenizer, max_len = datamodule.tokenizer, datamodule.max_len
    for name in ("train", "valid"):
        text = getattr(raw, name)
        text = text.read() if isinstance(text, ParallelFiles) else text
        src, tgt = tokenizer.encode_src(text.src), tokenizer.encode_tgt(text.tgt)
        keep = [i for i, (s, t) in enumerate(zip(src, tgt, strict=True)) if s and t]
        if name == "train":
            keep = [i for i in keep if max(len(src[i]), len(tgt[i])) <= max_len]
        split = datamodule.splits[name]
        assert len(split) == len(keep) > 0
        assert [split.src_ids[k] for k in range(len(split))] == [src[i][:max_len] for i in keep]
        assert [split.tgt_ids[k] for k in range(len(split))] == [tgt[i][:max_len] for i in keep]
    if data == "files":
        assert len(datamodule.splits["train"]) == 398  # the empty and the over-long pair dropped
        assert "train" not in datamodule.texts  # files are streamed, never held
    assert datamodule.texts["valid"].src == [
        raw.valid.src[i] for i in range(len(raw.valid)) if raw.valid.src[i]
    ]


def test_second_run_reuses_the_cache_and_a_touched_file_is_checked(tmp_path, compose_config, caplog):
    corpus = toy_files(tmp_path)
    caplog.set_level(logging.INFO, logger="seq2seq.data.prepared")
    first = files_datamodule(compose_config, corpus)
    folder = prepared_folder(tmp_path)
    files = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}
    assert caplog.text.count("Prepared data in") == 1
    caplog.clear()
    second = files_datamodule(compose_config, corpus)
    assert "Preparing data" not in caplog.text and f"Reusing prepared data in {folder}" in caplog.text
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()} == files
    assert second.tokenizer.state_dict() == first.tokenizer.state_dict()
    # A file written again with the same bytes (new mtime) is hashed, found unchanged, and reused.
    train_src = Path(corpus[0].split("=", 1)[1])
    os.utime(train_src, ns=(time.time_ns(), time.time_ns() + 10**9))
    caplog.clear()
    files_datamodule(compose_config, corpus)
    assert "content is unchanged" in caplog.text and "Preparing data" not in caplog.text


def test_editing_a_corpus_file_rebuilds(tmp_path, compose_config, caplog):
    corpus = toy_files(tmp_path)
    files_datamodule(compose_config, corpus)
    train_src = Path(corpus[0].split("=", 1)[1])
    lines = train_src.read_text(encoding="utf-8").splitlines()
    lines[0] = "w7 w7 w7"  # an edit to the source file only
    write(train_src, lines)
    caplog.set_level(logging.INFO, logger="seq2seq.data.prepared")
    datamodule = files_datamodule(compose_config, corpus)
    assert f"{train_src.resolve()} changed" in caplog.text and "Prepared data in" in caplog.text
    assert datamodule.splits["train"].src_ids[0] == datamodule.tokenizer.encode_src(["w7 w7 w7"])[0]
    assert len([p for p in (tmp_path / "cache" / "prepared").iterdir() if p.is_dir()]) == 1  # replaced


def test_same_corpus_and_settings_prepare_byte_identical_caches(tmp_path, compose_config):
    """What lets each node prepare its own cache: the seeded sample and sentencepiece are deterministic."""
    corpus = toy_files(tmp_path)
    folders = []
    for cache in ("node1", "node2"):
        datamodule = instantiate(compose_config(*FILES, *corpus, f"paths.cache_dir={tmp_path / cache}").data)
        folders.append(datamodule.build_or_reuse_cache())
    assert folders[0].name == folders[1].name
    for path in folders[0].iterdir():
        if path.name != "manifest.json":  # holds build times
            assert path.read_bytes() == (folders[1] / path.name).read_bytes(), path.name


def test_line_sample_is_seeded_and_bounded():
    def sample(seed: int) -> list[str]:
        drawn = LineSample(50, seed)
        for start in range(0, 1000, 300):
            drawn.add([f"line {i}" for i in range(start, min(start + 300, 1000))] + ["   "])
        return drawn.lines

    assert sample(1) == sample(1) != sample(2)
    assert len(sample(1)) == 50 == len(set(sample(1)))
    assert max(int(line.split()[1]) for line in sample(1)) > 500  # not just the first lines


def test_streamed_files_of_different_lengths_name_both(tmp_path):
    src = write(tmp_path / "a.de", [f"x{i}" for i in range(7)])
    tgt = write(tmp_path / "a.en", [f"y{i}" for i in range(5)])
    with pytest.raises(ValueError, match=rf"{src} has 7 lines, {tgt} has 5 lines"):
        list(ParallelFiles(src, tgt).chunks(3))


def test_workers_serve_the_same_batches_and_get_the_file_names_not_the_data(compose_config):
    datamodule = instantiate(compose_config("data=toy").data)
    datamodule.setup("fit")
    split = datamodule.splits["train"]
    assert len(pickle.dumps(split)) < 2000  # ids read from the cache travel as file names
    assert pickle.loads(pickle.dumps(split)).src_ids[5] == split.src_ids[5]
    loader = datamodule.train_dataloader()
    in_process = [(b.indices.tolist(), b.tgt_out.tolist()) for b in loader]
    # Forked workers inherit the split as it is; spawned ones (macOS; Linux from Python 3.14 starts
    # them by forkserver, alike) unpickle it, so each opens the cache files again.
    for start_method in ("fork", "spawn"):
        with_workers = DataLoader(
            split,
            batch_sampler=loader.batch_sampler,
            collate_fn=split.collate,
            num_workers=2,
            multiprocessing_context=start_method,
        )
        served = [(b.indices.tolist(), b.tgt_out.tolist()) for b in with_workers]
        assert served == in_process, start_method


def test_ragged_ids_round_trip():
    sequences = [[5, 6, 7], [8], [9, 10]]
    ragged = RaggedIds.from_lists(sequences)
    assert [ragged[i] for i in range(3)] == sequences
    assert ragged.padded(np.array([2, 0]), 4).tolist() == [[9, 10, 0, 0], [5, 6, 7, 0]]


@pytest.mark.slow
def test_a_killed_prepare_leaves_no_usable_looking_cache(tmp_path):
    lines = [" ".join(f"w{(i * 7 + j) % 50}" for j in range(i % 20 + 1)) for i in range(120_000)]
    corpus = [
        f"data.corpus.{key}={write(tmp_path / key, lines if key.startswith('train') else lines[:10])}"
        for key in ("train_src", "train_tgt", "valid_src", "valid_tgt")
    ]
    args = ["-m", "seq2seq.prepare", *FILES, *corpus, f"paths.cache_dir={tmp_path / 'cache'}"]
    process = subprocess.Popen([sys.executable, *args], cwd=REPO, stderr=subprocess.PIPE, text=True)
    root = tmp_path / "cache" / "prepared"
    deadline = time.monotonic() + 300
    while not any(root.glob("*.tmp-*/train.src.ids")):  # encoding has begun
        assert process.poll() is None and time.monotonic() < deadline, (
            "prepare ended before it could be killed"
        )
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    (left,) = [p for p in root.iterdir() if p.is_dir()]
    assert ".tmp-" in left.name  # only the temporary folder: nothing under the cache's own name
    assert stale_reason(root / left.name.split(".tmp-")[0]) == "no prepared data yet"

    result = run_script(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "left by an interrupted prepare" in result.stderr and "Prepared data in" in result.stderr
    (folder,) = [p for p in root.iterdir() if p.is_dir()]
    assert json.loads((folder / "manifest.json").read_text())["splits"]["train"]["kept"] == 120_000


@pytest.mark.slow
def test_two_ddp_processes_with_workers_prepare_once_and_train(tmp_path):
    result = run_script(
        "train.py", "experiment=smoke", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        "trainer.max_steps=6", "trainer.val_check_interval=6", "data.num_workers=2", "decoding.beam=1",
        f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}", *QUIET,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    logs = result.stdout + result.stderr
    assert logs.count("Preparing data into") == 1 and logs.count("Prepared data in") == 1
    # The other rank waits for the first to prepare (Lightning's launcher starts it after), then opens it.
    assert logs.count("Reusing prepared data") == 1 and "prepared by local rank 0 of node 0" in logs
    assert logs.count("Training took") == 2


def mapped_kb(folder: Path) -> int:
    """Resident kB of this process's mappings of the training split's ids, offsets and lengths."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if not line[0].isupper():
            name = Path(fields[5]).name if len(fields) >= 6 else ""
            inside = fields[-1].startswith(str(folder)) and name.startswith("train.") and name != "train.kept"
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def test_batches_read_from_the_cache_map_none_of_it_and_equal_the_encoding(compose_config, tmp_path):
    datamodule = instantiate(compose_config("data=toy").data)
    datamodule.setup("fit")
    split = datamodule.splits["train"]
    batches = datamodule._batch_sampler(split, "train").batches(epoch=0)[:20]
    in_memory = EncodedSplit(
        [split.src_ids[i] for i in range(len(split))], [split.tgt_ids[i] for i in range(len(split))]
    )
    for rows in batches:
        read, expected = split.collate(rows), in_memory.collate(rows)
        assert (
            read.src.tolist() == expected.src.tolist() and read.tgt_out.tolist() == expected.tgt_out.tolist()
        )
    # Read with pread through the page cache, which every process shares: nothing of the ids is
    # mapped into this process, so its unique memory does not grow with the pages it has read.
    assert mapped_kb(tmp_path / "cache") == 0


def bytes_read() -> int:
    """Bytes this process has read with read syscalls (from the disk or the page cache)."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["rchar"])


def test_training_setup_reads_the_training_ids_ahead_into_the_page_cache(compose_config, caplog, monkeypatch):
    datamodule = instantiate(compose_config("data=toy").data)
    with caplog.at_level(logging.INFO, logger="seq2seq.data.prepared"):
        datamodule.setup("fit")
        datamodule.reading_ahead.join()
    assert "in the page cache after" in caplog.text
    # One reader a node: another process of the node (as Lightning's launcher starts it) reads nothing.
    monkeypatch.setenv("LOCAL_RANK", "1")
    other = instantiate(compose_config("data=toy").data)
    other.setup("fit")
    assert other.reading_ahead is None and other.splits["train"].cache_files() == (
        datamodule.splits["train"].cache_files()
    )
    files = datamodule.splits["train"].cache_files()
    assert [path.name for path in files] == ["train.src.ids", "train.tgt.ids"]
    before = bytes_read()
    read_ahead(files, available=1 << 30).join()
    assert bytes_read() - before >= sum(path.stat().st_size for path in files)


def test_read_ahead_is_skipped_when_the_files_would_not_fit(tmp_path, caplog):
    ids = tmp_path / "train.src.ids"
    ids.write_bytes(bytes(4096))
    with caplog.at_level(logging.INFO, logger="seq2seq.data.prepared"):
        assert read_ahead([ids], available=8191) is None
    assert "Not reading the training ids (0 MB) ahead" in caplog.text
    assert read_ahead([ids], available=None) is None  # the OS does not say: no guess
    assert read_ahead([], available=1 << 30) is None  # ids in memory: nothing to read
    read_ahead([ids], available=8192).join()


# One process of a simulated cluster: instantiates the data config, sets it up as train() does before the
# Trainer exists, prints what it opened. Builds are slowed so that two nodes' builds overlap; "nolock"
# makes flock raise as on a file system mounted without lock support. (With PYTHONUNBUFFERED, as CI
# has it, print writes each argument in a write of its own: another thread's output can land between.)
CLUSTER_PROCESS = """
import errno, logging, sys, time
from hydra.utils import instantiate
from omegaconf import OmegaConf
import seq2seq.data.prepared.cache as cache
logging.basicConfig(level=logging.INFO, format="%(message)s")
if sys.argv[2] == "nolock":
    def flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")
    cache.fcntl.flock = flock
build = cache.build
def slow_build(*args):
    build(*args)
    time.sleep(3)
cache.build = slow_build
datamodule = instantiate(OmegaConf.load(sys.argv[1]))
datamodule.setup("fit")
reads_ahead = datamodule.reading_ahead is not None
if reads_ahead:  # its log line, written by another thread, must not land inside the line printed below
    datamodule.reading_ahead.join()
print(f"opened {datamodule.prepared} reads ahead: {reads_ahead}")
"""


@pytest.mark.parametrize("shared", [False, True], ids=["node-local-caches", "shared-cache-without-locks"])
@pytest.mark.slow
def test_two_nodes_of_two_ranks_prepare_once_per_node(tmp_path, compose_config, shared):
    """2 nodes x 2 ranks as processes with the environment a launcher gives them: only local rank 0 of
    each node builds, the others wait; no build removes or reads another's unfinished one (in a shared
    folder without locks both nodes build at once); all open the same cache; one process a node reads
    it ahead."""
    corpus = toy_files(tmp_path)
    processes = []
    for node in range(2):
        cache = tmp_path / ("shared" if shared else f"node{node}")
        data = compose_config(*FILES, *corpus, f"paths.cache_dir={cache}")
        config = tmp_path / f"data{node}.yaml"
        OmegaConf.save(data.data, config, resolve=True)
        for local in range(2):
            env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC"))}
            env.update(NODE_RANK=str(node), LOCAL_RANK=str(local), RANK=str(2 * node + local), WORLD_SIZE="4")
            argv = [sys.executable, "-c", CLUSTER_PROCESS, str(config), "nolock" if shared else "lock"]
            output = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
            processes.append(subprocess.Popen(argv, cwd=REPO, env=env, **output))
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    for output, process in zip(outputs, processes, strict=True):
        assert process.returncode == 0, output[-3000:]
    assert sum(output.count("Preparing data into") for output in outputs) == 2
    for node in range(2):
        node_outputs = outputs[2 * node : 2 * node + 2]
        shown = "\n--- next process ---\n".join(node_outputs)
        assert node_outputs[0].count("Preparing data into") == 1, shown
        assert node_outputs[1].count("Preparing data into") == 0, shown  # local rank 1 waits
        assert [output.count("reads ahead: True") for output in node_outputs] == [1, 0], shown
    opened = {output.split("opened ")[1].split(" reads ahead")[0] for output in outputs}
    folders = [Path(path) for path in opened]
    assert all(".tmp-" not in folder.name for folder in folders) and len({f.name for f in folders}) == 1
    assert len(folders) == (1 if shared else 2)
    for folder in folders:
        assert stale_reason(folder) is None
        assert [p.name for p in folder.parent.iterdir() if p.is_dir()] == [folder.name]  # no leftovers
    if shared:
        assert sum("No file locks in" in output for output in outputs) == 2
    else:
        for path in folders[0].iterdir():
            if path.name != "manifest.json":  # holds build times
                assert path.read_bytes() == (folders[1] / path.name).read_bytes(), path.name


@pytest.mark.parametrize("per_node", [True, False])
def test_the_first_process_of_a_second_node_prepares_only_per_node(
    tmp_path, compose_config, monkeypatch, caplog, per_node
):
    corpus = toy_files(tmp_path)
    files_datamodule(compose_config, corpus)  # by node 0's local rank 0, into a cache both nodes share
    if per_node:  # node 1 has not got it yet
        shutil.rmtree(prepared_folder(tmp_path))
    monkeypatch.setenv("NODE_RANK", "1")
    caplog.set_level(logging.INFO, logger="seq2seq.data.prepared")
    datamodule = instantiate(compose_config(*FILES, *corpus, f"data.prepare_per_node={per_node}").data)
    assert datamodule.prepares_here() == per_node
    datamodule.setup("fit")
    if per_node:
        assert "Prepared data in" in caplog.text
    else:  # waited for global rank 0 (found its cache at once here), building nothing
        assert "Preparing" not in caplog.text and "prepared by global rank 0" in caplog.text
    assert datamodule.reading_ahead is not None  # local rank 0 of its node


def test_a_live_build_on_another_host_is_left_alone_and_a_dead_one_removed(tmp_path, compose_config, caplog):
    corpus = toy_files(tmp_path)
    root = tmp_path / "cache" / "prepared"
    datamodule = files_datamodule(compose_config, corpus)
    key = datamodule.prepared.name
    shutil.rmtree(datamodule.prepared)  # so that the next setup builds again
    other_host = root / f"{key}.tmp-node-7.cluster-4242"  # a build on another host, alive
    old_other_host = root / f"{key}.tmp-node-8.cluster-4242"  # one that stopped its heartbeat an hour ago
    dead_here = root / f"{key}.tmp-{socket.gethostname()}-{2**22 + 1}"  # above pid_max: no such process
    alive_here = root / f"{key}.tmp-{socket.gethostname()}-{os.getppid()}"
    for folder in (other_host, old_other_host, dead_here, alive_here):
        folder.mkdir(parents=True)
        (folder / "train.src.ids").write_bytes(b"partial")
    hour_ago = time.time() - 3600
    os.utime(old_other_host, (hour_ago, hour_ago))
    caplog.set_level(logging.INFO, logger="seq2seq.data.prepared")
    files_datamodule(compose_config, corpus)
    assert other_host.is_dir() and alive_here.is_dir()
    assert not old_other_host.exists() and not dead_here.exists()
    assert caplog.text.count("left by an interrupted prepare") == 2


def test_an_mtime_only_change_is_hashed_once(tmp_path, compose_config, caplog, monkeypatch):
    corpus = toy_files(tmp_path)
    files_datamodule(compose_config, corpus)
    train_src = Path(corpus[0].split("=", 1)[1])
    os.utime(train_src, ns=(time.time_ns(), time.time_ns() + 10**9))  # as cp without -p, git checkout
    hashed = []
    digest = cache_module.file_digest
    monkeypatch.setattr(cache_module, "file_digest", lambda path: hashed.append(path) or digest(path))
    caplog.set_level(logging.INFO, logger="seq2seq.data.prepared")
    for _ in range(2):
        files_datamodule(compose_config, corpus)
    assert hashed == [train_src.resolve()] and caplog.text.count("content is unchanged") == 1
    manifest = json.loads((prepared_folder(tmp_path) / "manifest.json").read_text())
    assert manifest["inputs"][0]["mtime_ns"] == train_src.stat().st_mtime_ns
