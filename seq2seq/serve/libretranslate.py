"""LibreTranslate's API on our model, so its clients (browser extensions, chat and CMS plugins, client
libraries) work by pointing them at this server.

``POST /translate`` in its shape: ``q`` (a string, or a list of them), ``source`` (a code or ``auto``),
``target``, ``format`` (``text`` or ``html``), ``alternatives`` and ``api_key``, as JSON or form fields;
the answer is ``{"translatedText": ...}`` (a list for a list), with ``alternatives`` when asked and
``detectedLanguage`` for ``source=auto`` (the model's source language: there is no detection). A text's
lines are translated one by one and joined again; in HTML, each text between tags is translated (its
white space collapsed, as a browser shows it) and the tags are kept. ``GET /languages`` lists the pair.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from seq2seq.decoding import DecodingSettings
from seq2seq.serve.info import language_name
from seq2seq.serve.protocol import Job, Limits, RequestError, check_text, request_settings, unknown_key

# "secret" is what LibreTranslate's own web page sends with each request (we have no use for it).
KEYS = ("q", "source", "target", "format", "alternatives", "api_key", "secret")
TAG = re.compile(r"(<[^>]*>)")
RAW_TEXT = re.compile(r"<(script|style)\b", re.IGNORECASE)  # elements whose text is not prose


@dataclass(frozen=True)
class Text:
    """One ``q`` text: the pieces to translate, and the template that puts their translations back
    (strings as they are, an int the translation of that piece)."""

    pieces: list[str]
    template: list[str | int]
    html: bool

    def render(self, translations: list[str]) -> str:
        escape = (lambda t: html.escape(t, quote=False)) if self.html else (lambda t: t)
        return "".join(
            part if isinstance(part, str) else escape(translations[part]) for part in self.template
        )


def plain_text(text: str) -> Text:
    """Each line a piece, joined again by the line breaks."""
    lines = text.split("\n")
    template: list[str | int] = []
    for i in range(len(lines)):
        template.extend(["\n", i] if i else [i])
    return Text(lines, template, html=False)


def html_text(text: str) -> Text:
    """Each text between tags a piece (outside ``<script>`` and ``<style>``), its leading and trailing
    white space kept around its translation."""
    pieces: list[str] = []
    template: list[str | int] = []
    raw = None  # the raw-text element we are inside, whose content is not translated
    for part in TAG.split(text):
        if TAG.fullmatch(part):
            opening = RAW_TEXT.match(part)
            if opening:
                raw = opening.group(1).lower()
            elif raw and part.lower().startswith(f"</{raw}"):
                raw = None
            template.append(part)
        elif raw or not part.strip():
            template.append(part)
        else:
            core = part.strip()
            start = part.index(core)
            pieces.append(" ".join(html.unescape(core).split()))
            template.extend([part[:start], len(pieces) - 1, part[start + len(core) :]])
    return Text(pieces, template, html=True)


@dataclass(frozen=True)
class LibreRequest:
    """A checked request in LibreTranslate's shape, and the job of all its pieces."""

    texts: list[Text]
    batch: bool  # q was a list: the answer is a list too
    auto: bool  # source=auto: the answer names the language
    alternatives: int
    job: Job

    def answer(self, best: list[str], nbest: list[list[str]], source: str) -> dict[str, Any]:
        """The response body from each piece's translation (``best``) and n-best texts."""
        results, alternatives, start = [], [], 0
        for text in self.texts:
            end = start + len(text.pieces)
            main = text.render(best[start:end])
            results.append(main)
            # The k-th alternative: each piece's k-th hypothesis (LibreTranslate has none for HTML).
            others = (
                []
                if text.html
                else [text.render(kth(nbest[start:end], k)) for k in range(1, self.alternatives + 1)]
            )
            alternatives.append([t for t in dict.fromkeys(others) if t != main])
            start = end
        body: dict[str, Any] = {"translatedText": results if self.batch else results[0]}
        if self.auto:
            detected = {"confidence": 100.0, "language": source}
            body["detectedLanguage"] = [detected] * len(results) if self.batch else detected
        if self.alternatives:
            body["alternatives"] = alternatives if self.batch else alternatives[0]
        return body


def kth(nbest: list[list[str]], k: int) -> list[str]:
    """Each piece's k-th hypothesis, its best where it has fewer."""
    return [texts[k] if k < len(texts) else texts[0] for texts in nbest]


def parse_libre(
    values: Mapping[str, Any],
    defaults: DecodingSettings,
    limits: Limits,
    languages: tuple[str | None, str | None],
) -> LibreRequest:
    """A LibreTranslate request (JSON fields, or form fields: a repeated ``q`` is a list)."""
    for key in values:
        if key not in KEYS:
            raise unknown_key(key, KEYS)
    q, source, target = values.get("q"), values.get("source"), values.get("target")
    for name, value in (("q", q), ("source", source), ("target", target)):
        if not value:
            raise RequestError(400, f"Invalid request: missing {name} parameter")
    texts = q if isinstance(q, list) else [q]
    if not all(isinstance(text, str) for text in texts):
        raise RequestError(400, "Invalid request: q must be a string or a list of strings")
    for index, text in enumerate(texts):
        check_text(text, f"q[{index}]" if isinstance(q, list) else "q")
    model_source, model_target = languages
    if model_source is None or model_target is None:
        raise RequestError(
            400,
            "this model's languages are not known: start the server with source_lang=CODE target_lang=CODE",
        )
    if source not in (model_source, "auto") or target != model_target:
        raise RequestError(
            400, f"this model translates {model_source} to {model_target} only, not {source} to {target}"
        )
    text_format = values.get("format") or "text"
    if text_format not in ("text", "html"):
        raise RequestError(400, f"{text_format} format is not supported (text or html)")
    try:
        alternatives = max(0, int(values.get("alternatives") or 0))
    except (TypeError, ValueError, OverflowError):  # OverflowError: Infinity
        raise RequestError(400, "Invalid request: alternatives parameter is not a number") from None
    if alternatives >= defaults.beam:
        raise RequestError(
            400, f"Invalid request: alternatives must be below the beam size ({defaults.beam}) of this server"
        )
    parsed = [html_text(t) if text_format == "html" else plain_text(t.replace("\r\n", "\n")) for t in texts]
    pieces = [piece for text in parsed for piece in text.pieces]
    limits.check_lines(len(pieces))
    settings = request_settings(defaults, {"nbest": max(defaults.nbest, alternatives + 1)}, limits)
    job = Job(pieces, settings, with_nbest=alternatives > 0)
    return LibreRequest(parsed, isinstance(q, list), source == "auto", alternatives, job)


def languages_json(languages: tuple[str | None, str | None]) -> list[dict[str, Any]]:
    """``GET /languages``: the source language with the target as its one target, then the target."""
    source, target = languages
    if source is None or target is None:
        return []
    return [
        {"code": source, "name": language_name(source), "targets": [target]},
        {"code": target, "name": language_name(target), "targets": []},
    ]
