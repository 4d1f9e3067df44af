"""Several corpora in one run (``data=corpora``): each entry's weight and tag checked, its reader's
splits tagged and joined one after the other (:class:`~seq2seq.data.corpora.ConcatenatedText`) into one
:class:`~seq2seq.data.corpora.Corpus` that names its parts; and the many-to-one Bible mixture."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from seq2seq.data.corpora import ConcatenatedText, Corpus, CorpusPart, TaggedText, load_bible
from seq2seq.errors import UserError
from seq2seq.tokenization import TAG_PATTERN

# A split of a mixture of corpora: the corpus of each sentence, as a position in the list of each corpus's
# (name, target language).
MixtureSplit = tuple[Sequence[int], Sequence[tuple[str, str | None]]]

# sentencepiece's own special pieces look like tags but are not.
SPECIAL_PIECES = ("<pad>", "<unk>", "<s>", "</s>")


def check_tag(tag: str | None, option: str) -> str | None:
    """``tag`` if it is None or a ``<...>`` token that is not a special piece; else a ValueError."""
    if tag is not None and (not TAG_PATTERN.fullmatch(str(tag)) or tag in SPECIAL_PIECES):
        raise UserError(
            f"{option}={tag!r} must be one token in angle brackets like '<2en>', not one of {SPECIAL_PIECES}"
        )
    return tag


def load_corpora(corpora: dict[str, dict[str, Any]]) -> Corpus:
    """Several parallel corpora in one run (``data=corpora``): ``corpora`` maps each corpus's name to its
    ``reader`` (a callable returning a :class:`Corpus`, e.g. a partial of :func:`load_bible` or
    :func:`~seq2seq.data.corpora.load_files`), ``weight`` (its share of each training epoch, relative to
    the others'; > 0), ``tag`` (prepended to its source lines, e.g. ``<2en>``; null for none) and
    ``tgt_lang`` (null: the reader's). Every corpus must have a test split, or none.
    """
    option = "data.corpus.corpora"
    if not corpora:
        raise UserError(f"{option} lists no corpus")
    parts, read = [], []
    for name, entry in corpora.items():
        unknown = set(entry) - {"reader", "weight", "tag", "tgt_lang"}
        if unknown or "reader" not in entry:
            raise UserError(
                f"{option}.{name}: needs reader and may set weight, tag, tgt_lang; got {sorted(entry)}"
            )
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise UserError(f"{option}.{name}.weight must be a number > 0, got {weight!r}")
        tag = check_tag(entry.get("tag"), f"{option}.{name}.tag")
        corpus = entry["reader"]()
        parts.append(CorpusPart(str(name), float(weight), tag, entry.get("tgt_lang") or corpus.tgt_lang))
        read.append(corpus)
    if len({corpus.test is None for corpus in read}) > 1:
        raise UserError(f"{option}: some corpora have a test split and some not; give all or none")

    def joined(split: str) -> ConcatenatedText | None:
        if getattr(read[0], split) is None:
            return None
        return ConcatenatedText(
            [TaggedText(getattr(c, split), p.tag) for c, p in zip(read, parts, strict=True)]
        )

    languages = {part.tgt_lang for part in parts}
    return Corpus(
        joined("train"),
        joined("valid"),
        joined("test"),
        languages.pop() if len(languages) == 1 else None,
        tuple(parts),
    )


def load_bible_many_to_one(
    src_versions: list[str],
    tgt_version: str,
    valid_size: int,
    test_size: int,
    seed: int,
    train_size: int | None = None,
) -> Corpus:
    """Every version of ``src_versions`` into ``tgt_version``, one corpus each (named ``<src>-<tgt>``,
    equal weights, no tag) read with :func:`load_bible` and joined by :func:`load_corpora`. Every corpus
    holds out with the same ``seed``, so the held-out verses are the same for every source version: no
    target verse of the validation or test split is trained on in another language."""
    if not src_versions:
        raise UserError("data.corpus.src_versions lists no Bible version")
    reader = functools.partial(
        load_bible,
        tgt_version=str(tgt_version),
        valid_size=valid_size,
        test_size=test_size,
        seed=seed,
        train_size=train_size,
    )
    return load_corpora(
        {
            f"{v}-{tgt_version}": {"reader": functools.partial(reader, src_version=str(v))}
            for v in src_versions
        }
    )
