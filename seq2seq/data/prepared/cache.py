"""The prepared data cache: the sentencepiece model(s) and the encoded ids of every split, built once
and read by every process (DDP ranks, DataLoader workers, later runs) through the OS page cache.

A cache folder, ``<cache_dir>/prepared/<key>/``, holds per split and side (fairseq's layout) a flat
array of ids (``.ids``: uint16 when the vocabulary allows, else int32), their ``.offsets`` (int64,
one more than the pairs) and ``.lengths`` (int32), plus ``<split>.kept`` (int64: where each kept pair
was in the raw split), the model file(s), and ``manifest.json``: settings, counts, the watched input
files (size, mtime and SHA-256 of their bytes, taken while reading them), written last.

The key is a digest of the settings, ``max_len`` and what names each split (the paths of streamed
files; the content of in-memory text). A folder is built under a temporary name and renamed into
place, under a lock, so an interrupted build never leaves a folder that looks complete, and processes
started together build it once. It is rebuilt when a watched file changed: a changed size, or a
changed mtime with changed content (a file only touched is hashed again and reused).

This module owns the format: :class:`SplitWriter` writes it, :class:`RaggedIds` reads it, and
:func:`read_ahead` fills the page cache with it before training reads it at random places.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seq2seq.data.corpora import SPLITS, ConcatenatedText, Corpus
from seq2seq.errors import UserError, user_path
from seq2seq.tokenization import PAD_ID, SubwordSamples, SubwordSettings, Tokenizer

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the layout or the encoding changes
CHUNK_LINES = 100_000  # lines read and encoded at a time
SIDES = ("src", "tgt")


def subword_identity(settings: SubwordSettings, tokenizer: Tokenizer | None) -> dict[str, Any]:
    """What names the subword model(s): the settings to train them with, or the given model(s)."""
    return asdict(settings) if tokenizer is None else {"given": tokenizer.digest()}


def cache_key(
    corpus: Corpus, settings: SubwordSettings, max_len: int, tokenizer: Tokenizer | None = None
) -> str:
    """What the prepared data depends on, apart from the watched files' contents (``tokenizer``: the
    given sentencepiece model(s), e.g. a fine-tuned checkpoint's, instead of training them)."""
    named = {
        "format": FORMAT,
        "subword": subword_identity(settings, tokenizer),
        "max_len": max_len,
        **{name: split.identity() for name in SPLITS if (split := getattr(corpus, name)) is not None},
    }
    return hashlib.sha256(json.dumps(named, sort_keys=True).encode()).hexdigest()[:16]


# A build renews its temporary folder's mtime this often; another host's temporary folder older than
# LEFTOVER_AGE is taken for a killed build (on this host, its process id says whether it still runs).
HEARTBEAT_SECONDS = 30
LEFTOVER_AGE_SECONDS = 30 * 60
# What flock raises on file systems mounted without lock support (some NFS and Lustre mounts).
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


def build_or_reuse(
    corpus: Corpus,
    settings: SubwordSettings,
    max_len: int,
    cache_dir: str | Path,
    tokenizer: Tokenizer | None = None,
) -> Path:
    """The folder of the prepared data of ``corpus``: reused if up to date, else built now (encoded with
    ``tokenizer`` if given, else with sentencepiece trained as ``settings`` say).

    Processes that call this together (nodes sharing the cache) wait on a lock in the cache folder; the
    first builds, the others then find the cache and reuse it. Where the file system has no locks, each
    builds into its own temporary folder and the first to finish renames it into place; the others then
    reuse that one. A build never removes another's temporary folder while its owner may be alive.
    """
    root = Path(cache_dir) / "prepared"
    with user_path(cache_dir, "paths.cache_dir"):  # a file there, or no permission to write
        root.mkdir(parents=True, exist_ok=True)
    key = cache_key(corpus, settings, max_len, tokenizer)
    folder = root / key
    started = time.perf_counter()
    with open(root / f"{key}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as err:
            if err.errno not in NO_LOCKS:
                raise
            log.info("No file locks in %s (%s): preparing without one", root, os.strerror(err.errno))
        reason = stale_reason(folder)
        if reason is None:
            log.info("Reusing prepared data in %s (checked in %.1f s)", folder, time.perf_counter() - started)
            return folder
        log.info("Preparing data into %s: %s", folder, reason)
        for leftover in root.glob(f"{key}.tmp-*"):
            if build_is_dead(leftover):
                log.info("Removing %s, left by an interrupted prepare", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
        tmp = root / f"{key}.tmp-{this_build()}"
        tmp.mkdir()
        try:
            with heartbeat(tmp):
                build(corpus, settings, max_len, tmp, tokenizer)
            if not move_into_place(tmp, folder):
                shutil.rmtree(tmp)
                log.info("Reusing prepared data in %s, built meanwhile by another process", folder)
                return folder
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("Prepared data in %s in %.1f s", folder, time.perf_counter() - started)
    return folder


def this_build() -> str:
    """The owner part of a temporary folder's name: ``<host>-<pid>``."""
    return f"{socket.gethostname()}-{os.getpid()}"


def build_is_dead(tmp: Path) -> bool:
    """Whether the build writing into the temporary folder ``tmp`` has ended without finishing it: on
    this host, when its process is gone; on another, when it has not renewed the folder's mtime for
    LEFTOVER_AGE_SECONDS (its heartbeat stopped)."""
    owner = tmp.name.split(".tmp-", 1)[1].removeprefix("old-")
    host, _, pid = owner.rpartition("-")
    try:
        age = time.time() - tmp.stat().st_mtime
    except FileNotFoundError:
        return False  # renamed or removed by its owner meanwhile
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return int(pid) == os.getpid()  # the pid reused by this process: its build was killed
    return age > LEFTOVER_AGE_SECONDS


@contextmanager
def heartbeat(tmp: Path) -> Iterator[None]:
    """Renew ``tmp``'s mtime every HEARTBEAT_SECONDS while the body runs, so that processes on other
    hosts can tell this build is alive."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(HEARTBEAT_SECONDS):
            with suppress(FileNotFoundError):
                os.utime(tmp)

    thread = threading.Thread(target=beat, name="prepare-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def move_into_place(tmp: Path, folder: Path) -> bool:
    """Rename the finished build ``tmp`` to ``folder``; False (``tmp`` left as it is) if an up-to-date
    ``folder`` appeared meanwhile (built where our lock is not seen: another node, or no locks)."""
    if stale_reason(folder) is None:
        return False
    if folder.exists():  # out of date: set aside first (a folder cannot be renamed onto another)
        old = folder.with_name(f"{folder.name}.tmp-old-{this_build()}")
        with suppress(FileNotFoundError):  # another process without our lock set it aside first
            folder.rename(old)
            shutil.rmtree(old)
    try:
        tmp.rename(folder)
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or stale_reason(folder) is not None:
            raise
        return False  # another build was renamed into place between our check and our rename
    return True


def wait_for_prepared(
    corpus: Corpus,
    settings: SubwordSettings,
    max_len: int,
    cache_dir: str | Path,
    tokenizer: Tokenizer | None = None,
    *,
    preparer: str,
) -> Path:
    """The folder of the prepared data that :func:`build_or_reuse` makes of the same arguments, once the
    process that prepares it (``preparer``, for the log) has: checked every second without taking the
    lock or hashing anything."""
    folder = Path(cache_dir) / "prepared" / cache_key(corpus, settings, max_len, tokenizer)
    started = last_said = time.monotonic()
    while (reason := stale_reason(folder, hash_modified=False)) is not None:
        if time.monotonic() - last_said > 60:
            waited = time.monotonic() - started
            log.info("Waiting %.0f s for %s to prepare %s: %s", waited, preparer, folder, reason)
            last_said = time.monotonic()
        time.sleep(1)
    log.info("Reusing prepared data in %s, prepared by %s", folder, preparer)
    return folder


def stale_reason(folder: Path, hash_modified: bool = True) -> str | None:
    """Why the cache in ``folder`` cannot be used, or None if it can.

    A watched file with another mtime but its size is hashed (``hash_modified``) and, if its content
    is unchanged, its new mtime is written into the manifest, so that the next check costs nothing;
    without ``hash_modified`` it makes the cache stale (for processes that wait for the one checking).
    """
    manifest_path = folder / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no prepared data yet"
    except (OSError, ValueError) as err:
        return f"unreadable manifest ({err})"
    if manifest.get("format") != FORMAT:
        return f"prepared in format {manifest.get('format')}, this version reads format {FORMAT}"
    touched = False
    for watched in manifest["inputs"]:
        path = Path(watched["path"])
        try:
            stat = path.stat()
        except FileNotFoundError:
            return f"{path} is gone"
        if stat.st_size != watched["size"]:
            return f"{path} changed ({watched['size']} bytes when prepared, {stat.st_size} now)"
        if stat.st_mtime_ns != watched["mtime_ns"]:
            if not hash_modified:
                return f"{path} was modified since it was prepared (its content is being checked)"
            if file_digest(path) != watched["sha256"]:
                return f"{path} changed (same size, other content)"
            log.info("%s was modified on disk but its content is unchanged (SHA-256 checked)", path)
            watched["mtime_ns"] = stat.st_mtime_ns
            touched = True
    for name, size in manifest["files"].items():
        if not (folder / name).is_file() or (folder / name).stat().st_size != size:
            return f"{folder / name} is missing or incomplete"
    if touched:
        write_manifest(manifest_path, manifest)
    return None


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest`` to ``path`` atomically: readers see the old file or the new one, whole."""
    partial = path.with_name(f"{path.name}.tmp-{this_build()}")
    with open(partial, "w", encoding="utf-8") as out:
        json.dump(manifest, out, indent=1)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def build(
    corpus: Corpus, settings: SubwordSettings, max_len: int, folder: Path, tokenizer: Tokenizer | None = None
) -> None:
    """Train sentencepiece on a seeded sample of the training split (unless ``tokenizer`` is given),
    then encode every split into ``folder``, reading each in chunks; ``manifest.json`` is written last."""
    started = time.perf_counter()
    subword = subword_identity(settings, tokenizer)  # before a tokenizer is trained
    watched = corpus.train.files
    stats = {path: path.stat() for path in watched}
    digests = None  # of the watched files' bytes: taken by the sampling pass, else by the encoding pass
    if tokenizer is None:
        digests = {path: hashlib.sha256() for path in watched}
        samples = SubwordSamples(settings)
        for src, tgt in corpus.train.chunks(CHUNK_LINES, digests):
            samples.add(src, tgt)
        log.info(
            "Training sentencepiece (%s) on %d sampled lines of %d", settings,
            len(samples.src.lines) + (0 if settings.joint else len(samples.tgt.lines)),
            samples.src.seen + (0 if settings.joint else samples.tgt.seen),
        )  # fmt: skip
        tokenizer = samples.train(corpus.train.origin)
    sampled = time.perf_counter()
    models = {"joint.model": tokenizer.src_model} if tokenizer.joint else {
        "src.model": tokenizer.src_model, "tgt.model": tokenizer.tgt_model,
    }  # fmt: skip
    for name, model in models.items():
        (folder / name).write_bytes(model)
    id_type = np.uint16 if max(tokenizer.src_vocab_size, tokenizer.tgt_vocab_size) <= 2**16 else np.int32
    splits = {}
    for name in SPLITS:
        if (text := getattr(corpus, name)) is None:
            continue
        check = {path: hashlib.sha256() for path in watched} if name == "train" else None
        writer = SplitWriter(folder, name, id_type, max_len, truncate=name != "train")
        part_ends = []  # pairs read up to the end of each corpus of a mixture
        for part in text.parts if isinstance(text, ConcatenatedText) else [text]:
            for src, tgt in part.chunks(CHUNK_LINES, check):
                writer.add(tokenizer.encode_arrays(src, "src"), tokenizer.encode_arrays(tgt, "tgt"))
            part_ends.append(writer.counts["read"])
        splits[name] = {**writer.close(), "part_ends": part_ends}
        if check is not None and digests is None:
            digests = check
        elif check is not None and any(check[p].digest() != digests[p].digest() for p in watched):
            raise UserError(f"{text.origin} changed while it was being prepared; run again")
    inputs = [
        {"path": str(path.resolve()), "size": stats[path].st_size, "mtime_ns": stats[path].st_mtime_ns,
         "sha256": digests[path].hexdigest()}
        for path in watched
    ]  # fmt: skip
    manifest = {
        "format": FORMAT,
        "subword": subword,
        "max_len": max_len,
        "id_type": np.dtype(id_type).name,
        "inputs": inputs,
        "splits": splits,
        "origins": {name: getattr(corpus, name).origin for name in splits},
        "seconds": {"sentencepiece": sampled - started, "total": time.perf_counter() - started},
        "files": {path.name: path.stat().st_size for path in folder.iterdir()},
    }
    write_manifest(folder / "manifest.json", manifest)


def map_array(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    """``count`` values of ``dtype`` in ``path``, memory-mapped read-only (an empty file maps to [])."""
    if count == 0:
        return np.zeros(0, dtype)
    with path.open("rb") as stream:  # the mapping outlives the file descriptor
        mapping = mmap.mmap(stream.fileno(), 0, prot=mmap.PROT_READ)
    return np.frombuffer(mapping, dtype=dtype, count=count)


def every_nth(path: Path, count: int, n: int, chunk: int = 1 << 20) -> np.ndarray:
    """Values 0, n, 2n, ... of the ``count`` int64 values in ``path``, read a chunk at a time."""
    chunk -= chunk % n  # so that each chunk starts at a multiple of n
    parts = []
    with path.open("rb") as stream:
        for first in range(0, count, chunk):
            values = np.fromfile(stream, np.int64, count=min(chunk, count - first))
            if len(values) < min(chunk, count - first):
                raise UserError(f"{path}: {first + len(values)} values, expected {count}")
            parts.append(values[::n])
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def memory_available() -> int | None:
    """Bytes the OS could give without swapping (``MemAvailable``), or None where it does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def read_ahead(paths: list[Path], available: int | None) -> threading.Thread | None:
    """Read ``paths`` once, in a background thread, so that the OS page cache holds them.

    Batches read their sequences at random places; from a cold page cache each read waits on the disk
    (150 batches/s instead of 1,900 at 10M pairs here, worse on network file systems), while one
    sequential read fills the cache at the disk's full speed (4 s for 1.9 GB here). Skipped (None)
    unless the files fit in half the ``available`` memory: reading more would evict what it read.
    """
    if not paths or available is None:
        return None
    size = sum(path.stat().st_size for path in paths)
    if size > available // 2:
        log.info(
            "Not reading the training ids (%.0f MB) ahead: more than half the memory available (%.0f MB)",
            size / 1e6, available / 1e6,
        )  # fmt: skip
        return None

    def read() -> None:
        started = time.perf_counter()
        buffer = bytearray(1 << 24)
        for path in paths:
            with path.open("rb", buffering=0) as stream:
                while stream.readinto(buffer):  # the GIL is released while the OS reads
                    pass
        log.info(
            "Training ids (%.0f MB) in the page cache after %.1f s", size / 1e6, time.perf_counter() - started
        )

    thread = threading.Thread(target=read, name="read-ahead", daemon=True)
    thread.start()
    return thread


class RaggedIds:
    """Id sequences of varying length stored flat: sequence i is ``ids[offsets[i]:offsets[i + 1]]``.

    Either in memory (:meth:`from_lists`) or in a prepared cache folder (:meth:`open`). From the cache,
    each sequence is read with ``pread``: from the OS page cache, which every process shares (DDP ranks,
    DataLoader workers, later runs), without mapping the file into this process. A memory map made each
    process's unique memory grow with the cache pages it had touched (the kernel maps whole page-cache
    folios, up to megabytes, per read). In memory are only the lengths (4 bytes a sequence) and every
    ``BLOCK``-th offset: a sequence starts at its block's offset plus the lengths before it in the block.
    Pickling one read from the cache (for spawned DataLoader workers) sends where it is, not the data.
    """

    BLOCK = 64

    def __init__(
        self,
        lengths: np.ndarray,
        block_offsets: np.ndarray,
        ids: np.ndarray | None,
        source: tuple | None = None,
    ) -> None:
        self.lengths, self.block_offsets, self.ids, self.source = lengths, block_offsets, ids, source
        if ids is None:  # read from the cache: source is (folder, name, id_type, count, tokens)
            folder, name, id_type, _, tokens = source
            self.path = folder / f"{name}.ids"
            self.id_type = np.dtype(id_type)
            self.file = self.path.open("rb")  # pread needs no seek: forked workers may share it
            size = os.fstat(self.file.fileno()).st_size
            if size != tokens * self.id_type.itemsize:
                raise UserError(f"{self.path}: {size} bytes, expected {tokens} ids of {self.id_type}")

    @classmethod
    def from_lists(cls, sequences: Sequence[Sequence[int]]) -> RaggedIds:
        lengths = np.fromiter(map(len, sequences), dtype=np.int32, count=len(sequences))
        ids = np.fromiter((i for seq in sequences for i in seq), dtype=np.int32, count=int(lengths.sum()))
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        return cls(lengths, offsets[:: cls.BLOCK].copy(), ids)

    @classmethod
    def open(cls, folder: Path, name: str, id_type: np.dtype, count: int, tokens: int) -> RaggedIds:
        """The ``count`` sequences (``tokens`` ids) of ``name`` in a prepared cache folder."""
        lengths = np.fromfile(folder / f"{name}.lengths", np.int32, count=count)
        if len(lengths) != count:
            raise UserError(f"{folder / name}.lengths: {len(lengths)} lengths, expected {count}")
        block_offsets = every_nth(folder / f"{name}.offsets", count + 1, cls.BLOCK)
        return cls(lengths, block_offsets, None, source=(folder, name, id_type, count, tokens))

    def __len__(self) -> int:
        return len(self.lengths)

    def starts(self, indices: np.ndarray) -> np.ndarray:
        """(len(indices),) int64: where each sequence's ids begin in the flat array."""
        indices = np.asarray(indices, dtype=np.int64)
        first = indices - indices % self.BLOCK
        columns = np.arange(self.BLOCK)
        block = np.minimum(first[:, None] + columns, len(self.lengths) - 1)  # past the end: masked below
        before = np.where(columns < (indices - first)[:, None], self.lengths[block], 0).sum(axis=1)
        return self.block_offsets[indices // self.BLOCK] + before

    def read(self, start: int, length: int) -> np.ndarray:
        """The ``length`` ids from position ``start`` of the flat array."""
        if self.ids is not None:
            return self.ids[start : start + length]
        size = self.id_type.itemsize
        data = os.pread(self.file.fileno(), length * size, start * size)
        if len(data) != length * size:
            raise UserError(f"{self.path}: ended before id {start + length} (the file changed?)")
        return np.frombuffer(data, self.id_type)

    def __getitem__(self, index: int) -> list[int]:
        return self.read(int(self.starts(np.array([index]))[0]), int(self.lengths[index])).tolist()

    def padded(self, indices: np.ndarray, width: int) -> np.ndarray:
        """(len(indices), width) int64 ids of the given sequences, PAD_ID after each one's end."""
        out = np.full((len(indices), width), PAD_ID, dtype=np.int64)
        lengths = self.lengths[indices].tolist()
        for row, (start, length) in enumerate(zip(self.starts(indices).tolist(), lengths, strict=True)):
            out[row, :length] = self.read(start, length)
        return out

    def __getstate__(self) -> dict[str, Any]:
        if self.source is None:
            return self.__dict__
        return {"source": self.source}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "ids" in state:
            self.__dict__.update(state)
        else:
            self.__dict__.update(RaggedIds.open(*state["source"]).__dict__)


class SplitWriter:
    """Appends encoded chunks of one split to its files, dropping (training) or truncating pairs."""

    def __init__(self, folder: Path, name: str, id_type: type, max_len: int, truncate: bool) -> None:
        self.name, self.id_type, self.max_len, self.truncate = name, id_type, max_len, truncate
        self.stack = ExitStack()  # closed by close(), or by build()'s cleanup of the folder
        names = [f"{side}.{kind}" for side in SIDES for kind in ("ids", "offsets", "lengths")] + ["kept"]
        self.files = {
            name_: self.stack.enter_context((folder / f"{name}.{name_}").open("wb")) for name_ in names
        }
        self.ends = {side: 0 for side in SIDES}
        for side in SIDES:
            self.files[f"{side}.offsets"].write(np.zeros(1, np.int64).tobytes())
        self.counts = {"read": 0, "empty": 0, "too_long": 0, "truncated": 0, "kept": 0}

    def add(self, src: list[np.ndarray], tgt: list[np.ndarray]) -> None:
        lengths = {
            side: np.fromiter(map(len, ids), np.int64, len(ids))
            for side, ids in zip(SIDES, (src, tgt), strict=True)
        }
        empty = (lengths["src"] == 0) | (lengths["tgt"] == 0)
        long = ~empty & (np.maximum(lengths["src"], lengths["tgt"]) > self.max_len)
        kept = np.flatnonzero(~empty if self.truncate else ~empty & ~long)
        self.counts["read"] += len(src)
        self.counts["empty"] += int(empty.sum())
        self.counts["truncated" if self.truncate else "too_long"] += int(long.sum())
        self.counts["kept"] += len(kept)
        self.files["kept"].write((kept + self.counts["read"] - len(src)).astype(np.int64).tobytes())
        for side, ids in zip(SIDES, (src, tgt), strict=True):
            pieces = [ids[i][: self.max_len] for i in kept]
            kept_lengths = np.minimum(lengths[side][kept], self.max_len)
            flat = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
            self.files[f"{side}.ids"].write(flat.astype(self.id_type).tobytes())
            self.files[f"{side}.lengths"].write(kept_lengths.astype(np.int32).tobytes())
            self.files[f"{side}.offsets"].write((self.ends[side] + np.cumsum(kept_lengths)).tobytes())
            self.ends[side] += int(kept_lengths.sum())

    def close(self) -> dict[str, int]:
        for stream in self.files.values():
            stream.flush()
            os.fsync(stream.fileno())
        self.stack.close()
        return {**self.counts, "src_tokens": self.ends["src"], "tgt_tokens": self.ends["tgt"]}


@dataclass
class PreparedData:
    """A prepared cache, opened: the tokenizer, each split's (source, target) ids read from the cache,
    and its counts; for a mixture of corpora, the corpus (its position in the mixture) of each kept pair."""

    folder: Path
    tokenizer: Tokenizer
    ids: dict[str, tuple[RaggedIds, RaggedIds]]
    kept: dict[str, np.ndarray]  # where each kept pair was in the raw split
    counts: dict[str, dict[str, Any]]
    corpus_ids: dict[str, np.ndarray | None]  # (kept pairs,) int16; None for a single corpus


def open_prepared(folder: Path) -> PreparedData:
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    models = [
        (folder / name).read_bytes()
        for name in ("joint.model", "src.model", "tgt.model")
        if (folder / name).is_file()
    ]
    tokenizer = Tokenizer(models[0], models[1] if len(models) > 1 else None)
    id_type = np.dtype(manifest["id_type"])
    ids, kept, corpus_ids = {}, {}, {}
    for name, counts in manifest["splits"].items():
        pairs = counts["kept"]
        src, tgt = (
            RaggedIds.open(folder, f"{name}.{side}", id_type, pairs, counts[f"{side}_tokens"])
            for side in SIDES
        )
        ids[name] = (src, tgt)
        kept[name] = map_array(folder / f"{name}.kept", np.int64, pairs)
        ends = counts.get("part_ends", [])
        many = len(ends) > 1
        corpus_ids[name] = np.searchsorted(ends, kept[name], side="right").astype(np.int16) if many else None
    return PreparedData(folder, tokenizer, ids, kept, manifest["splits"], corpus_ids)
