"""Corpus BLEU and chrF with sacrebleu, on detokenized text, with their signatures.

BLEU's tokenizer follows the target language as sacrebleu chooses it (``zh`` for Chinese, ``ja-mecab``
for Japanese, ``ko-mecab`` for Korean, ``13a`` otherwise), unless one is named explicitly.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from sacrebleu.metrics import BLEU, CHRF

from seq2seq.errors import UserError

log = logging.getLogger(__name__)

# The extras that give sacrebleu's MeCab tokenizers what they need.
MECAB_EXTRAS = {"ja-mecab": "ja", "ko-mecab": "ko"}


@dataclass(frozen=True)
class CorpusScores:
    bleu: float
    chrf: float
    bleu_signature: str
    chrf_signature: str

    def __str__(self) -> str:
        bleu = f"BLEU = {self.bleu:.2f}  ({self.bleu_signature})"
        return f"{bleu}\nchrF = {self.chrf:.2f}  ({self.chrf_signature})"


def corpus_scores(
    hypotheses: Sequence[str],
    references: Sequence[str],
    tgt_lang: str | None = None,
    bleu_tokenize: str | None = None,
) -> CorpusScores:
    """Corpus BLEU (exp smoothing) and chrF against one reference, for text in ``tgt_lang`` (an ISO
    639-1 code such as ``en``, ``zh``, ``ja``; None: unknown, which gives ``13a``).

    ``bleu_tokenize`` names a sacrebleu tokenizer and overrides the choice by language. Where the
    language's own tokenizer cannot run (``ja-mecab`` or ``ko-mecab`` without their packages), BLEU
    falls back to ``char`` with a warning that says so; a tokenizer named explicitly must run.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    bleu, chrf = bleu_metric(tgt_lang, check_bleu_tokenize(bleu_tokenize)), CHRF()
    refs = [list(references)]
    bleu_score = bleu.corpus_score(list(hypotheses), refs)
    chrf_score = chrf.corpus_score(list(hypotheses), refs)
    return CorpusScores(
        bleu_score.score, chrf_score.score, str(bleu.get_signature()), str(chrf.get_signature())
    )


def scores_by_corpus(
    hypotheses: Sequence[str],
    references: Sequence[str],
    corpus_ids: Sequence[int],
    corpora: Sequence[tuple[str, str | None]],
    bleu_tokenize: str | None = None,
) -> dict[str, CorpusScores]:
    """Corpus scores of each corpus of a mixture, by name: the sentences whose ``corpus_ids`` is the
    corpus's position in ``corpora`` ((name, target language) pairs), BLEU tokenized for its language."""
    scores = {}
    for corpus, (name, tgt_lang) in enumerate(corpora):
        rows = [row for row, owner in enumerate(corpus_ids) if owner == corpus]
        scores[name] = corpus_scores(
            [hypotheses[row] for row in rows], [references[row] for row in rows], tgt_lang, bleu_tokenize
        )
    return scores


def mean_over_corpora(by_corpus: dict[str, CorpusScores]) -> tuple[float, float]:
    """A mixture's BLEU and chrF: the means over its corpora (each corpus counts the same, whatever its
    size), as validation picks the best checkpoint by and the length penalty is chosen by."""
    return (
        sum(s.bleu for s in by_corpus.values()) / len(by_corpus),
        sum(s.chrf for s in by_corpus.values()) / len(by_corpus),
    )


def check_bleu_tokenize(name: str | None) -> str | None:
    """``name`` if it is None or one of sacrebleu's tokenizers; otherwise a ValueError naming the option."""
    if name is not None and name not in BLEU.TOKENIZERS:
        raise UserError(
            f"evaluate.bleu_tokenize must be null (the target language's choice) or one of"
            f" {sorted(BLEU.TOKENIZERS)}, got {name!r}"
        )
    return name


@functools.cache
def bleu_metric(tgt_lang: str | None, tokenize: str | None) -> BLEU:
    """sacrebleu's BLEU for ``tgt_lang``; built once per process (MeCab's start-up is not free, and the
    fall-back warning is then given once)."""
    try:
        return BLEU(tokenize=tokenize, trg_lang=tgt_lang or "")
    except RuntimeError as err:  # sacrebleu's message when MeCab or its dictionary is missing
        chosen = tokenize or BLEU._TOKENIZER_MAP.get(tgt_lang or "")
        if tokenize is not None or chosen not in MECAB_EXTRAS:
            raise UserError(f"evaluate.bleu_tokenize={tokenize}: {err}".strip()) from None
        log.warning(
            "BLEU for target language %r: sacrebleu's %s tokenizer needs MeCab and its dictionary"
            " (pip install 'seq2seq-lstm[%s]'); scoring with the 'char' tokenizer instead, so these"
            " BLEU scores are not comparable with %s ones (the signature says tok:char)",
            tgt_lang,
            chosen,
            MECAB_EXTRAS[chosen],
            chosen,
        )
        return BLEU(tokenize="char")
