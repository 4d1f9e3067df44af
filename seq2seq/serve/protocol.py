"""What a translation request may say, checked: the server's limits, the per-request decoding keys and
the native request shape ``{"src": ["a line", ...], "beam": 4, ...}``.

Plain Python (no torch, no web framework): every mistake is a :class:`RequestError` with its HTTP status
and a one-line message naming the key at fault.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from seq2seq.decoding import DecodingSettings
from seq2seq.errors import UserError, is_int

# Decoding keys a request may not set: the server's resources, not how a sentence is translated.
SERVER_ONLY = ("batch_tokens",)
# Every other field of DecodingSettings is a per-request key, so new decoding options need no change here.
REQUEST_DECODING_KEYS = tuple(f.name for f in fields(DecodingSettings) if f.name not in SERVER_ONLY)
NATIVE_KEYS = ("src", "attention", "api_key", *REQUEST_DECODING_KEYS)


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx) and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    """What one request may ask: ``max_lines`` lines, a body of ``max_bytes`` bytes, ``beam`` up to
    ``max_beam``, and length limits that allow at most ``max_output_len`` output subwords for the
    model's longest source (``max_src_len`` subwords: longer lines are truncated, as translate.py does)."""

    max_lines: int
    max_bytes: int
    max_beam: int
    max_output_len: int
    max_src_len: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any], max_src_len: int) -> Limits:
        """The limits of ``config`` (conf/serve.yaml); a UserError names a bad one."""
        values = {}
        for name in ("max_lines", "max_bytes", "max_beam", "max_output_len"):
            value = config[name]
            if not (is_int(value) and value >= 1):
                raise UserError(f"{name} must be a positive integer, got {value!r}")
            values[name] = value
        return cls(**values, max_src_len=max_src_len)

    def check_lines(self, count: int) -> None:
        if count > self.max_lines:
            raise RequestError(
                413, f"{count} lines in one request; this server takes at most {self.max_lines} (max_lines)"
            )

    def check_settings(self, settings: DecodingSettings) -> None:
        """Refuse settings that would let one request hold the decoder for long."""
        if settings.beam > self.max_beam:
            raise RequestError(400, f"beam={settings.beam}: this server allows at most {self.max_beam}")
        longest = settings.max_len_a * self.max_src_len + settings.max_len_b  # inf for a huge max_len_a
        if longest >= self.max_output_len + 1:
            raise RequestError(
                400,
                f"max_len_a={settings.max_len_a} and max_len_b={settings.max_len_b} allow {longest:.0f}"
                f" output subwords for the longest source ({self.max_src_len} subwords); this server allows"
                f" at most {self.max_output_len} (max_output_len)",
            )


@dataclass(frozen=True)
class Job:
    """A checked request: its lines, how to decode them, and what the answer holds besides the best
    translations (the n-best lists, the attention of each line)."""

    lines: list[str]
    settings: DecodingSettings
    attention: bool = False
    with_nbest: bool = False


def unknown_key(key: str, known: tuple[str, ...]) -> RequestError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"the keys are {', '.join(known)}"
    return RequestError(400, f"unknown key {key!r}; {hint}")


def request_settings(
    defaults: DecodingSettings, overrides: Mapping[str, Any], limits: Limits
) -> DecodingSettings:
    """The server's settings with a request's decoding keys (``overrides``) in place, checked."""
    for key in SERVER_ONLY:
        if key in overrides:
            raise RequestError(400, f"{key} is the server's setting (python -m seq2seq.serve {key}=N)")
    try:
        settings = DecodingSettings(**{**asdict(defaults), **overrides})
    except UserError as err:
        raise RequestError(400, str(err)) from None
    limits.check_settings(settings)
    return settings


def check_text(value: str, where: str) -> str:
    """Text that UTF-8 can hold: JSON's escapes can send a lone surrogate (\\ud800), which no file holds."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RequestError(400, f"{where} holds a lone surrogate (character {err.start}), not text") from None
    return value


def check_line(value: Any, where: str) -> str:
    """One line of a request: a string without a line break (translate.py reads a file's lines)."""
    if not isinstance(value, str):
        raise RequestError(400, f"{where} must be a string, got {type(value).__name__}")
    if "\n" in value:
        raise RequestError(400, f"{where} holds a line break: send each line as its own string")
    return check_text(value, where)


def parse_native(body: Any, defaults: DecodingSettings, limits: Limits) -> Job:
    """A native request, ``{"src": [lines], "attention": bool, "api_key": str, <decoding keys>}``."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the request must be a JSON object, got {type(body).__name__}")
    for key in body:
        if key not in NATIVE_KEYS and key not in SERVER_ONLY:
            raise unknown_key(key, NATIVE_KEYS)
    src = body.get("src")
    if not isinstance(src, list):
        got = "nothing" if src is None else type(src).__name__
        raise RequestError(400, f"src must be a list of strings (one per line), got {got}")
    limits.check_lines(len(src))
    lines = [check_line(line, f"src[{i}]") for i, line in enumerate(src)]
    attention = body.get("attention", False)
    if not isinstance(attention, bool):
        raise RequestError(400, f"attention must be true or false, got {attention!r}")
    overrides = {key: body[key] for key in (*REQUEST_DECODING_KEYS, *SERVER_ONLY) if key in body}
    settings = request_settings(defaults, overrides, limits)
    return Job(lines, settings, attention, with_nbest="nbest" in body or settings.nbest > 1)
