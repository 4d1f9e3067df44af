"""Lines of UTF-8 text files, as every reader of text reads them: the corpus readers, the translator's
input files and stdin, the evaluation's references. Imports nothing heavier than the standard library."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from seq2seq.errors import MissingFileError, UserError, user_path


class Digest(Protocol):
    """A hashlib hash object."""

    def update(self, data: bytes, /) -> None: ...


def read_text_lines(stream: BinaryIO, name: str, digest: Digest | None = None) -> Iterator[str]:
    """Lines of a UTF-8 byte stream, split on newline only (a stray CR or U+2028 never splits a line).

    Line endings, a trailing CR and a leading byte-order mark are removed; invalid UTF-8 raises
    ValueError naming ``name`` and the line number. ``digest``, if given, is updated with every byte read.
    """
    for line_no, raw in enumerate(stream, start=1):
        if digest is not None:
            digest.update(raw)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"{name}, line {line_no}: invalid UTF-8 ({err.reason})") from None
        if line_no == 1:
            line = line.removeprefix("\ufeff")
        yield line.removesuffix("\n").removesuffix("\r")


def read_lines(path: str | Path) -> list[str]:
    """All lines of a UTF-8 text file (see :func:`read_text_lines`).

    Raises a UserError naming the file (and the line, for bad UTF-8): MissingFileError if it is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"Corpus file not found: {path}")
    with open_corpus_file(path) as stream:
        return list(read_text_lines(stream, str(path)))


def open_corpus_file(path: Path) -> BinaryIO:
    """``path`` opened for reading; the OS's refusal (no permission, a folder) is a UserError naming it."""
    with user_path(path):
        return path.open("rb")
