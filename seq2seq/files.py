"""Files the toolkit writes whole: they appear complete or not at all, with the user's usual permissions."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """A file object whose content replaces ``path`` when the block ends without an exception.

    It is written to a temporary file beside ``path`` (removed on any exception, Ctrl-C included),
    then renamed, so ``path`` is never seen half-written. The file is created as ``open`` creates files,
    0666 less the umask (tempfile's files are 0600: on a shared cluster, colleagues could not read them).
    """
    path = Path(path)
    temporary = path.resolve().parent / f".{path.name}.{secrets.token_hex(4)}.part"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, mode, encoding=encoding) as file:
            yield file
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)  # nothing left there after the rename
