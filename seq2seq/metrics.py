"""Corpus BLEU and chrF with sacrebleu, on detokenized text, with their signatures."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sacrebleu.metrics import BLEU, CHRF


@dataclass(frozen=True)
class CorpusScores:
    bleu: float
    chrf: float
    bleu_signature: str
    chrf_signature: str

    def __str__(self) -> str:
        bleu = f"BLEU = {self.bleu:.2f}  ({self.bleu_signature})"
        return f"{bleu}\nchrF = {self.chrf:.2f}  ({self.chrf_signature})"


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> CorpusScores:
    """sacrebleu's default corpus BLEU (13a tokenization, exp smoothing) and chrF against one reference."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    bleu, chrf = BLEU(), CHRF()
    refs = [list(references)]
    bleu_score = bleu.corpus_score(list(hypotheses), refs)
    chrf_score = chrf.corpus_score(list(hypotheses), refs)
    return CorpusScores(
        bleu_score.score, chrf_score.score, str(bleu.get_signature()), str(chrf.get_signature())
    )
