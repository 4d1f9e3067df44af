"""Optional API keys (``api_keys_file=``): one key a line; blank lines and ``#`` comments are skipped.

The file is read again when it changes, so keys are added or revoked without a restart. A request
gives its key as ``api_key`` (a JSON or form field, or the query string) or in an
``Authorization: Bearer KEY`` header.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from seq2seq.errors import MissingFileError, UserError, user_path


def read_keys(path: Path) -> frozenset[str]:
    with user_path(path, "api_keys_file"):
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a byte order mark is not a key
    keys = frozenset(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise UserError(f"api_keys_file: {path} holds no key (one a line)")
    return keys


class ApiKeys:
    """The keys of ``path`` (None: no keys needed)."""

    def __init__(self, path: str | None) -> None:
        self.path = None if path is None else Path(path)
        self._keys: frozenset[str] = frozenset()
        self._stamp: tuple[int, int] | None = None
        if self.path is not None:
            if not self.path.is_file():
                raise MissingFileError(f"api_keys_file not found: {self.path}")
            stat = os.stat(self.path)
            self._keys, self._stamp = read_keys(self.path), (stat.st_mtime_ns, stat.st_size)

    @property
    def required(self) -> bool:
        return self.path is not None

    def _reload(self) -> None:
        """Read the file again if it changed; a file emptied or removed meanwhile keeps the last keys."""
        assert self.path is not None
        try:
            stat = os.stat(self.path)
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp:
                self._keys, self._stamp = read_keys(self.path), stamp
        except (OSError, UserError):
            pass

    def allows(self, key: str | None) -> bool:
        """Whether a request with ``key`` may go on (any request, where no keys are set)."""
        if self.path is None:
            return True
        if not key:
            return False
        self._reload()
        # surrogatepass: a key sent with a lone surrogate (JSON's \\udc80) matches none, without an error
        given = key.encode("utf-8", "surrogatepass")
        return any(hmac.compare_digest(given, known.encode()) for known in self._keys)
