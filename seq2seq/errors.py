"""The exception a user's mistake raises: the commands print it as one line ``error: ...`` and exit 2.

Raised where a mistake is detected (a bad option value, a missing or unreadable file the user named,
corpora that do not match, a file that is not a checkpoint of this toolkit), with a message that names
the option, file or line at fault. Every other exception is a bug, in this package or a library, and
the commands show its traceback (seq2seq/cli.py decides). A leaf: it imports nothing of the package.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class UserError(ValueError):
    """A user's mistake. A ValueError, so that callers that catch bad values catch it too."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist. A FileNotFoundError too."""


def is_int(value: object) -> bool:
    """Whether an option's ``value`` is an integer (a bool is not, though Python says it is)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """Whether an option's ``value`` is a number (an int or a float, not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# What the OS answers when a path names nothing usable: missing, a folder where a file should be (or
# the reverse), no permission, a read-only file system, a name too long or looping through links.
PATH_ERRORS = frozenset(
    {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EROFS}
    | {errno.ENAMETOOLONG, errno.ELOOP}
)


@contextmanager
def user_path(path: str | Path, option: str | None = None) -> Iterator[None]:
    """Reports the OS's refusal of ``path``, which the user gave (as ``option``, if named), as a
    UserError naming both: ``option: path: Permission denied``. Only refusals of the path itself (see
    PATH_ERRORS): a failure while reading or writing (a full disk, an I/O error) keeps its traceback."""
    try:
        yield
    except OSError as err:
        if err.errno not in PATH_ERRORS:
            raise
        where = f"{option}: {path}" if option else str(path)
        kind = MissingFileError if err.errno == errno.ENOENT else UserError
        raise kind(f"{where}: {err.strerror}") from None
