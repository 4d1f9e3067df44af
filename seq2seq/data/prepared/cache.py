"""Which prepared folder a run reads: ``<cache_dir>/prepared/<key>/``, reused if up to date, else built
(:mod:`seq2seq.data.prepared.build`) under a lock; and whether it is up to date.

The key is a digest of the settings, ``max_len`` and what names each split (the paths of streamed
files; the content of in-memory text). A folder is built under a temporary name and renamed into
place, under a lock, so an interrupted build never leaves a folder that looks complete, and processes
started together build it once. It is rebuilt when a watched file changed: a changed size, or a
changed mtime with changed content (a file only touched is hashed again and reused).

The processes that do not prepare wait for the folder (:func:`wait_for_prepared`). A preparing process
claims the preparation in ``<key>.preparer-<host>-<pid>.json`` (renewed while it prepares, marked failed
if it fails), so that they give up, naming it, if it stops without finishing instead of waiting forever.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from seq2seq.data.corpora import SPLITS, Corpus
from seq2seq.data.prepared.build import build, subword_identity, this_build, write_manifest
from seq2seq.data.prepared.format import FORMAT
from seq2seq.errors import UserError, user_path
from seq2seq.tokenization import SubwordSettings, Tokenizer

log = logging.getLogger(__name__)


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
# A claim of a preparer on another host is taken for a dead one when its heartbeat (every
# HEARTBEAT_SECONDS) is this old; waiting processes give up when no process has claimed the
# preparation for NO_PREPARER_SECONDS (the preparer failed before it reached the cache).
CLAIM_STALE_SECONDS = 5 * 60
NO_PREPARER_SECONDS = 5 * 60
# A claim that stopped after this process started is the one this process was waiting for (where the
# claim does not name this launch of the job: see launch_id).
PROCESS_STARTED = time.time()


def launch_id() -> str | None:
    """What the processes of one launch of a job share and no other launch does, from the launcher's
    environment: SLURM's job, step and restart count, or torchrun's run id and restart count; None
    elsewhere (Lightning's own launcher starts the other processes after the data is prepared).

    A claim marked failed by the same launch is the one a waiting process waits for, even if it failed
    before that process started (the tasks of a job start seconds apart, and a bad line fails a
    preparation in less); without it, a failed claim older than this process is taken for an earlier
    run's, and the process waited NO_PREPARER_SECONDS before giving up without the preparer's error.
    """
    if job := os.environ.get("SLURM_JOB_ID"):
        step, restart = os.environ.get("SLURM_STEP_ID", ""), os.environ.get("SLURM_RESTART_COUNT", "0")
        return f"slurm-{job}.{step}-{restart}"
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    if run and run != "none":
        return f"torchrun-{run}-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return None


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
    with preparing(root, key):
        return build_under_lock(corpus, settings, max_len, root / key, tokenizer)


def build_under_lock(
    corpus: Corpus, settings: SubwordSettings, max_len: int, folder: Path, tokenizer: Tokenizer | None
) -> Path:
    """:func:`build_or_reuse`'s work: ``folder`` checked under the lock, built if stale."""
    root, key = folder.parent, folder.name
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
    """Renew the mtime of ``tmp`` (a build's folder, a claim) every HEARTBEAT_SECONDS while the body
    runs, so that processes on other hosts can tell this build is alive."""
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


@dataclass
class Claim:
    """A process's claim of a preparation (``<key>.preparer-<host>-<pid>.json``): who, in which launch of
    a job (:func:`launch_id`), whether it failed (the error's first line), and when its file last changed
    (its heartbeat, by the file system's clock)."""

    path: Path
    host: str
    pid: int
    launch: str | None
    failed: str | None
    beat: float

    @classmethod
    def read(cls, path: Path) -> Claim | None:
        """The claim in ``path``; None if it is gone (its preparer finished) or half-written."""
        try:
            beat = path.stat().st_mtime
            record = json.loads(path.read_text(encoding="utf-8"))
            launch, failed = record.get("launch"), record.get("failed")
            return cls(path, record["host"], int(record["pid"]), launch, failed, beat)
        except (OSError, ValueError, KeyError):
            return None

    def alive(self) -> bool:
        """Preparing still: on this host, while its process runs; on another, while its heartbeat beats."""
        if self.failed is not None:
            return False
        if self.host == socket.gethostname():
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:  # alive, another user's
                return True
            return True
        return time.time() - self.beat < CLAIM_STALE_SECONDS

    def __str__(self) -> str:
        return f"host {self.host}, pid {self.pid}"

    def how_it_stopped(self) -> str:
        if self.failed is not None:
            return f"failed: {self.failed}"
        if self.host == socket.gethostname():
            return "its process is gone"
        return f"no heartbeat for {time.time() - self.beat:.0f} s"


def claims(root: Path, key: str) -> list[Claim]:
    return [claim for path in root.glob(f"{key}.preparer-*.json") if (claim := Claim.read(path)) is not None]


@contextmanager
def preparing(root: Path, key: str) -> Iterator[None]:
    """Claim the preparation of ``key`` for this process while the body runs (its claim's mtime renewed
    every HEARTBEAT_SECONDS); the claim is removed when the body returns and marked failed, with the
    error's first line, when it raises. Claims left by preparers that stopped are removed first."""
    for old in claims(root, key):
        if not old.alive():
            old.path.unlink(missing_ok=True)
    path = root / f"{key}.preparer-{this_build()}.json"
    record = {"host": socket.gethostname(), "pid": os.getpid(), "launch": launch_id()}
    write_manifest(path, record)
    try:
        with heartbeat(path):
            yield
    except BaseException as err:
        text = str(err).strip().splitlines()
        first = text[0] if text else ""
        error = first if isinstance(err, UserError) else f"{type(err).__name__}: {first}".rstrip(": ")
        write_manifest(path, {**record, "failed": error})
        raise
    path.unlink(missing_ok=True)


def wait_for_prepared(
    corpus: Corpus,
    settings: SubwordSettings,
    max_len: int,
    cache_dir: str | Path,
    tokenizer: Tokenizer | None = None,
    *,
    preparer: str,
    limit_seconds: float | None = None,
) -> Path:
    """The folder of the prepared data that :func:`build_or_reuse` makes of the same arguments, once the
    process that prepares it (``preparer``, for the log) has: checked every second without taking the
    lock or hashing anything.

    A UserError naming the preparer (host, pid) if it stops without finishing: a claim seen preparing,
    or one that stopped after this process started or in this launch of the job, that failed or whose
    process is gone (on another host: whose heartbeat stopped); if no process has claimed the
    preparation for NO_PREPARER_SECONDS; or after ``limit_seconds`` (``data.prepare_wait_seconds``;
    None: no limit).
    """
    folder = Path(cache_dir) / "prepared" / cache_key(corpus, settings, max_len, tokenizer)
    launch = launch_id()
    started = last_said = unclaimed_since = time.monotonic()
    seen: set[Path] = set()  # claims seen preparing
    while (reason := stale_reason(folder, hash_modified=False)) is not None:
        now = time.monotonic()
        found = claims(folder.parent, folder.name)
        alive = [claim for claim in found if claim.alive()]
        seen.update(claim.path for claim in alive)
        if alive:
            unclaimed_since = now
        elif stopped := [
            c for c in found if c.path in seen or c.beat >= PROCESS_STARTED or (launch and c.launch == launch)
        ]:
            claim = stopped[0]
            raise UserError(
                f"{preparer} ({claim}) stopped preparing {folder} without finishing it"
                f" ({claim.how_it_stopped()}): no data to train on (its log says more)"
            )
        elif now - unclaimed_since > NO_PREPARER_SECONDS:
            raise UserError(
                f"No process has been preparing {folder} for {now - unclaimed_since:.0f} s: {preparer}"
                " failed before it started (its log says why), or prepares into another paths.cache_dir"
                " (data.prepare_per_node=false needs one cache folder shared by all nodes)"
            )
        if limit_seconds is not None and now - started > limit_seconds:
            owners = "; ".join(str(claim) for claim in alive)
            raise UserError(
                f"Gave up waiting for {preparer} ({owners}) to prepare {folder} after {limit_seconds:g} s"
                " (data.prepare_wait_seconds): raise it, or prepare ahead with python -m seq2seq.prepare"
            )
        if now - last_said > 60:
            owners = "; ".join(str(claim) for claim in alive) or "not started yet"
            log.info(
                "Waiting %.0f s for %s (%s) to prepare %s: %s",
                now - started,
                preparer,
                owners,
                folder,
                reason,
            )
            last_said = now
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


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
