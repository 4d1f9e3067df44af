"""Lexical shortlists (Marian's ``--shortlist``): per sentence, the few target subwords its translation
may use, so that each decoding step scores those instead of the whole vocabulary.

A table is built once from the training data the checkpoint records: IBM Model 1 (a few EM iterations
over the co-occurring subword pairs, no NULL word) gives p(target piece | source piece), and the
table keeps the :data:`DEPTH` most likely target pieces of each source piece, best first, and every
target piece ranked by its frequency. It is stored beside the checkpoint as
``shortlist-<tokenizer digest>.pt`` (one per run folder: all checkpoints of a run share it) and is
rebuilt when missing or made for another tokenizer.

A sentence's shortlist is EOS, the ``frequent`` most frequent target pieces and the ``k`` most likely
of each of its own source pieces. A batch scores the union of its sentences' shortlists (one matrix
product, as Marian does), but each sentence only its own: unlike Marian's, a sentence's translation does
not depend on the sentences decoded with it (a server batches whatever arrives).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from seq2seq.decoding import SHORTLIST_DEPTH as DEPTH
from seq2seq.files import atomic_write
from seq2seq.tokenization import BOS_ID, EOS_ID, PAD_ID, Tokenizer

log = logging.getLogger(__name__)

MAX_PAIRS = 100_000  # training pairs the table is estimated from (the first ones): memory ~ 5 kB a pair
ITERATIONS = 5  # EM iterations of IBM Model 1
DENSE_KEYS = 1 << 26  # up to 8,192 x 8,192 pieces a table of every (source, target) pair: no key lookups
FORMAT = 1


@dataclass
class Shortlist:
    """A batch's shortlist: ids (U,) the union of its sentences' target ids, EOS first; allowed (batch,
    U) which of them each sentence may write."""

    ids: Tensor
    allowed: Tensor


@dataclass
class LexicalTable:
    """translations (src_vocab, DEPTH): per source piece its most likely target pieces, best first,
    -1 where it has fewer; frequent (tgt_vocab,): the target pieces, most frequent first."""

    translations: np.ndarray
    frequent: np.ndarray

    def shortlist(self, sources: Sequence[Sequence[int]], k: int, frequent: int) -> Shortlist:
        """The shortlist of each source sentence (lists of source ids): EOS, the ``frequent`` most
        frequent target pieces and the ``k`` best translations of its pieces."""
        vocab = len(self.frequent)
        allowed = np.zeros((len(sources), vocab), dtype=bool)
        allowed[:, self.frequent[:frequent]] = True
        for row, ids in enumerate(sources):
            translations = self.translations[np.asarray(ids, dtype=np.int64), :k].ravel()
            allowed[row, translations[translations >= 0]] = True
        allowed[:, [PAD_ID, BOS_ID, EOS_ID]] = False  # EOS comes first; PAD and BOS are never written
        union = np.flatnonzero(allowed.any(axis=0))
        ids = np.concatenate([[EOS_ID], union])
        allowed = np.concatenate([np.ones((len(sources), 1), dtype=bool), allowed[:, union]], axis=1)
        return Shortlist(torch.from_numpy(ids), torch.from_numpy(allowed))


def build_table(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]],
    src_vocab: int,
    tgt_vocab: int,
    iterations: int = ITERATIONS,
    chunk: int = 2000,
) -> LexicalTable:
    """IBM Model 1 over ``pairs`` of (source ids, target ids) arrays: the :class:`LexicalTable` of the
    :data:`DEPTH` most probable target pieces per source piece, and the target pieces by frequency.

    Each chunk of sentence pairs keeps the key of each of its (target token, source token) couples: the
    index of a (source piece, target piece) pair in a table of all of them, or for large vocabularies
    in a table of those that co-occur.
    """
    frequency = np.zeros(tgt_vocab, dtype=np.int64)
    chunks = []
    for src, tgt in _batched(pairs, chunk):
        frequency += np.bincount(np.concatenate(tgt), minlength=tgt_vocab)
        chunks.append(_couples(src, tgt, tgt_vocab))
    dense = src_vocab * tgt_vocab <= DENSE_KEYS
    if dense:  # every (source, target) pair has a slot: a key is its own index
        size, source_of_key = src_vocab * tgt_vocab, None
    else:  # only the pairs that co-occur have one
        table_keys = np.unique(np.concatenate([np.unique(keys) for keys, _ in chunks]))
        chunks = [(np.searchsorted(table_keys, keys), per_token) for keys, per_token in chunks]
        size, source_of_key = len(table_keys), torch.from_numpy(table_keys // tgt_vocab)
    # Per chunk: each couple's key index, and which target token of the chunk it belongs to (int32: a
    # Bible's 29,000 pairs have some 40 million couples).
    couples = [
        (
            torch.from_numpy(keys.astype(np.int32)),
            torch.from_numpy(np.repeat(np.arange(len(per_token), dtype=np.int32), per_token)),
            len(per_token),
        )
        for keys, per_token in chunks
    ]
    probabilities = torch.ones(size)
    for _ in range(iterations):
        counts = torch.zeros(size)
        for index, group, tokens in couples:
            # E-step: each target token's alignment over its sentence's source tokens.
            p = probabilities[index]
            totals = torch.zeros(tokens).index_add_(0, group, p)
            counts.index_add_(0, index, p / totals[group])
        # M-step: p(t | s), the counts normalized per source piece
        if dense:
            grid = counts.view(src_vocab, tgt_vocab)
            probabilities = (grid / grid.sum(dim=1, keepdim=True).clamp(min=1e-30)).view(-1)
        else:
            totals = torch.zeros(src_vocab).index_add_(0, source_of_key, counts)
            probabilities = counts / totals[source_of_key].clamp(min=1e-30)
    translations = np.full((src_vocab, DEPTH), -1, dtype=np.int64)
    if dense:
        best, ids = probabilities.view(src_vocab, tgt_vocab).topk(min(DEPTH, tgt_vocab), dim=1)
        translations[:, : ids.size(1)] = torch.where(best > 0, ids, -1).numpy()
    else:
        seen = (probabilities > 0).numpy()
        table_keys, sources_of_keys = table_keys[seen], source_of_key.numpy()[seen]
        order = np.lexsort((-probabilities.numpy()[seen], sources_of_keys))
        sources = sources_of_keys[order]
        rank = np.arange(len(order)) - np.searchsorted(sources, sources)
        kept = rank < DEPTH
        translations[sources[kept], rank[kept]] = (table_keys % tgt_vocab)[order][kept]
    return LexicalTable(translations, np.argsort(-frequency, kind="stable"))


def _batched(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]], size: int
) -> Iterator[tuple[list[np.ndarray], list[np.ndarray]]]:
    src: list[np.ndarray] = []
    tgt: list[np.ndarray] = []
    for s, t in pairs:
        if len(s) and len(t):
            src.append(np.asarray(s, dtype=np.int64))
            tgt.append(np.asarray(t, dtype=np.int64))
        if len(src) == size:
            yield src, tgt
            src, tgt = [], []
    if src:
        yield src, tgt


def _couples(src: list[np.ndarray], tgt: list[np.ndarray], tgt_vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (target token, source token) couple of each pair, target token by target token: the keys
    ``source id * tgt_vocab + target id``, and per target token its pair's source length."""
    src_lengths = np.array([len(s) for s in src])
    tgt_lengths = np.array([len(t) for t in tgt])
    per_token = np.repeat(src_lengths, tgt_lengths)  # (target tokens,) source length of its pair
    src_start = np.repeat(np.concatenate([[0], np.cumsum(src_lengths)[:-1]]), tgt_lengths)
    first = np.repeat(np.cumsum(per_token) - per_token, per_token)
    source_index = np.repeat(src_start, per_token) + np.arange(per_token.sum()) - first
    keys = np.concatenate(src)[source_index] * tgt_vocab + np.repeat(np.concatenate(tgt), per_token)
    return keys, per_token


def table_path(checkpoint: str | Path, tokenizer: Tokenizer) -> Path:
    """Where the table of ``checkpoint``'s run is kept: beside it, named by the tokenizer."""
    return Path(checkpoint).parent / f"shortlist-{tokenizer.digest()[:16]}.pt"


def load_or_build(
    checkpoint: str | Path, tokenizer: Tokenizer, run_config: dict[str, Any]
) -> LexicalTable | None:
    """The lexical table kept beside ``checkpoint``, or one built now from the training data that
    ``run_config`` records (and kept there). None, with a warning, where that data cannot be read:
    decoding then scores the whole vocabulary."""
    path = table_path(checkpoint, tokenizer)
    if path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if stored.get("format") == FORMAT and stored.get("tokenizer") == tokenizer.digest():
                return LexicalTable(stored["translations"].numpy(), stored["frequent"].numpy())
        except (RuntimeError, OSError, KeyError, AttributeError) as err:
            log.warning("shortlist: cannot read %s (%s); building it again", path, err)
    started = time.perf_counter()
    try:
        pairs = training_pairs(tokenizer, run_config)
        table = build_table(pairs, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    except Exception as err:  # any reason the training data is gone: decode without a shortlist
        log.warning(
            "shortlist: the training data of %s cannot be read (%s: %s); decoding with the whole"
            " vocabulary (shortlist=false says so without this warning)", checkpoint, type(err).__name__, err,
        )  # fmt: skip
        return None
    stored = {
        "format": FORMAT,
        "tokenizer": tokenizer.digest(),
        "translations": torch.from_numpy(table.translations.astype(np.int32)),
        "frequent": torch.from_numpy(table.frequent.astype(np.int32)),
    }
    try:
        with atomic_write(path) as file:
            torch.save(stored, file)
        kept = f"kept in {path}"
    except OSError as err:
        kept = f"not kept ({err})"
    log.info("shortlist: built from the training data in %.1f s, %s", time.perf_counter() - started, kept)
    return table


def training_pairs(
    tokenizer: Tokenizer, run_config: dict[str, Any]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The first :data:`MAX_PAIRS` training pairs (as subword ids) of the corpus ``run_config`` names,
    those within the run's ``data.max_len`` (as training kept them)."""
    from hydra.utils import instantiate

    data = run_config.get("data") or {}
    if not data.get("corpus"):
        raise ValueError("the checkpoint records no training corpus")
    corpus = instantiate(data["corpus"])()
    max_len = data.get("max_len", 256)
    count = 0
    for src_lines, tgt_lines in corpus.train.chunks(10_000):
        sources = tokenizer.encode_arrays(src_lines, "src")
        targets = tokenizer.encode_arrays(tgt_lines, "tgt")
        for src, tgt in zip(sources, targets, strict=True):
            if 0 < len(src) <= max_len and 0 < len(tgt) <= max_len:
                yield src, tgt
                count += 1
                if count == MAX_PAIRS:
                    return
