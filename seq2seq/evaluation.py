"""Evaluation after training: the length penalty chosen on the validation split (``decoding.alpha=auto``)
and the test split scored with the best checkpoint, exactly as ``translate.py ... ref=...`` would."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from seq2seq.checkpoints import store_alpha
from seq2seq.data.corpora import ParallelText
from seq2seq.data.mixture import MixtureSplit
from seq2seq.data.text import read_lines
from seq2seq.decoding import AUTO, UNTUNED_ALPHA, DecodingSettings
from seq2seq.errors import UserError
from seq2seq.metrics import (
    check_bleu_tokenize,
    corpus_scores,
    mean_over_corpora,
    scores_by_corpus,
)
from seq2seq.precision import DECODING_PRECISIONS
from seq2seq.search import best_for_alpha
from seq2seq.translator import FileReport, Translator, translate_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlphaChoice:
    """What :func:`choose_alpha` found: the chosen alpha, and for each alpha of the grid its BLEU and
    translations; the seconds it took."""

    alpha: float
    bleu: dict[float, float]
    translations: dict[float, list[str]]
    seconds: float

    @property
    def tied(self) -> bool:
        """Whether every alpha scored the same BLEU: there is nothing to choose."""
        return len(set(self.bleu.values())) == 1


def check_alpha_grid(grid: Sequence[float]) -> list[float]:
    """The distinct values of ``grid``, sorted; a ValueError naming ``evaluate.alpha_grid`` unless they
    are numbers >= 0 (at least one)."""
    if not grid or not all(isinstance(a, (int, float)) and not isinstance(a, bool) and a >= 0 for a in grid):
        raise UserError(f"evaluate.alpha_grid must be a non-empty list of numbers >= 0, got {list(grid)}")
    return sorted({float(alpha) for alpha in grid})


def evaluation_settings(cfg: DictConfig) -> DecodingSettings:
    """The decoding settings of the run, with ``cfg.evaluate`` checked too: mistakes fail before training."""
    check_bleu_tokenize(cfg.evaluate.bleu_tokenize)
    if cfg.evaluate.precision not in DECODING_PRECISIONS:  # checked on the decoding device once it is known
        raise UserError(
            f"evaluate.precision must be one of {DECODING_PRECISIONS}, got {cfg.evaluate.precision!r}"
        )
    check_alpha_grid(OmegaConf.to_container(cfg.evaluate.alpha_grid, resolve=True))
    return DecodingSettings.from_config(cfg.decoding, prefix="decoding.")


def choose_alpha(
    translator: Translator,
    sources: Sequence[str],
    references: Sequence[str],
    settings: DecodingSettings,
    grid: Sequence[float],
    mixture: MixtureSplit | None = None,
) -> AlphaChoice:
    """The length penalty of ``grid`` whose beam search translations of ``sources`` score the best BLEU
    against ``references`` (the smallest alpha on a tie). For a mixture of corpora (``mixture``: the
    corpus of each sentence), BLEU is the mean of the corpora's, each tokenized for its target
    language, as validation's ``val_bleu`` is.

    One beam search gives every alpha's translations (see :func:`~seq2seq.search.beam_candidates`), so
    a grid costs about what one decoding of ``sources`` costs.
    """
    grid = check_alpha_grid(grid)
    started = time.perf_counter()
    candidates = translator.beam_candidates(sources, settings)
    translations = {
        alpha: [texts[best_for_alpha([h for _, h in texts], alpha)][0] for texts in candidates]
        for alpha in grid
    }

    def bleu_of(outputs: list[str]) -> float:
        if mixture is None:
            return corpus_scores(outputs, references, translator.tgt_lang, translator.bleu_tokenize).bleu
        return mean_over_corpora(scores_by_corpus(outputs, references, *mixture, translator.bleu_tokenize))[0]

    bleu = {alpha: bleu_of(outputs) for alpha, outputs in translations.items()}
    best = max(grid, key=lambda alpha: bleu[alpha])
    return AlphaChoice(best, bleu, translations, time.perf_counter() - started)


def tune_alpha(
    translator: Translator,
    checkpoint: str,
    valid: ParallelText,
    settings: DecodingSettings,
    grid: list[float],
    mixture: MixtureSplit | None = None,
) -> AlphaChoice:
    """``decoding.alpha=auto``: choose the length penalty on the validation split (of a ``mixture`` of
    corpora: by the mean of their BLEU), log the BLEU of each alpha, store the choice in ``checkpoint``
    and use it in ``translator`` from now on."""
    choice = choose_alpha(translator, valid.src, valid.tgt, settings, grid, mixture)
    table = ", ".join(f"{alpha:g}: {bleu:.2f}" for alpha, bleu in choice.bleu.items())
    if choice.tied:
        log.info(
            "decoding.alpha=auto: not tuned, every alpha scores BLEU %.2f on the validation split (beam %d,"
            " %.1f s): the length penalty makes no difference to this model yet; alpha=auto uses %g",
            choice.bleu[choice.alpha],
            settings.beam,
            choice.seconds,
            UNTUNED_ALPHA,
        )
        translator.alpha = UNTUNED_ALPHA
        return choice
    log.info(
        "decoding.alpha=auto: alpha %g chosen on the validation split (%d sentences, beam %d;"
        " BLEU by alpha %s) in %.1f s",
        choice.alpha,
        len(valid),
        settings.beam,
        table,
        choice.seconds,
    )
    store_alpha(checkpoint, choice.alpha, choice.bleu)
    translator.alpha = choice.alpha
    return choice


def score_test(
    translator: Translator, test: ParallelText, output_dir: Path, settings: DecodingSettings
) -> FileReport:
    """Score the test split exactly as ``translate.py ... ref=...`` would.

    The run directory keeps test.src, test.ref and test.hyp, so the figures can be reproduced.
    """
    source, reference, hypothesis = (output_dir / f"test.{ext}" for ext in ("src", "ref", "hyp"))
    source.write_text("".join(line + "\n" for line in test.src), encoding="utf-8")
    reference.write_text("".join(line + "\n" for line in test.tgt), encoding="utf-8")
    return translate_file(
        translator, str(source), str(hypothesis), settings, ref_path=str(reference), progress=False
    )


def evaluate_best_checkpoint(
    checkpoint: str,
    device: torch.device,
    texts: dict[str, ParallelText],
    output_dir: Path,
    settings: DecodingSettings,
    evaluate: DictConfig,
    mixtures: dict[str, MixtureSplit] | None = None,
    validations: int | None = None,
) -> dict[str, Any]:
    """What a run does with its best checkpoint after training, as ``evaluate`` says: choose its length
    penalty (``decoding.alpha=auto`` with a beam, on the validation split; greedy search has no use for
    one), also without test scoring, so that the checkpoint a sweep hands on translates as tuned; then
    score the test split and print the scores. Decodes on ``device``, the one that trained (a GPU decodes
    many times faster than the CPU).

    ``mixtures``, for a mixture of corpora: by split (``valid``, ``test``), the corpus of each pair and
    the (name, target language) of each corpus. The length penalty is then chosen by the mean of the
    corpora's validation BLEU, the test split is also scored per corpus, and ``test_bleu`` is the mean
    of the corpora's BLEU, as validation's ``val_bleu`` is.

    A run that validated fewer than ``evaluate.min_validations`` times (``validations``; None: not
    counted) trained too little for the length penalty to matter: alpha is not tuned, which saves a beam
    search of the validation split.

    Returns the fields for result.json: ``test_bleu`` (and ``test_bleu_by_corpus``), ``test_seconds``
    and, when tuned, the alpha choice.
    """
    tune = settings.alpha == AUTO and settings.beam > 1 and "valid" in texts
    if tune and validations is not None and validations < evaluate.min_validations:
        log.info(
            "decoding.alpha=auto: not tuned, the run validated %d time(s), fewer than"
            " evaluate.min_validations=%d; alpha=auto uses %g",
            validations,
            evaluate.min_validations,
            UNTUNED_ALPHA,
        )
        tune = False
    test = texts.get("test") if evaluate.test else None
    if not (tune or test):
        return {"test_bleu": None}
    translator = Translator.from_checkpoint(checkpoint, device, evaluate.precision)
    fields: dict[str, Any] = {"test_bleu": None}
    if tune:
        grid = OmegaConf.to_container(evaluate.alpha_grid, resolve=True)
        valid_mixture = (mixtures or {}).get("valid")
        choice = tune_alpha(translator, checkpoint, texts["valid"], settings, grid, valid_mixture)
        alpha = None if choice.tied else choice.alpha
        fields.update(alpha=alpha, alpha_bleu=choice.bleu, alpha_seconds=choice.seconds)
    elif translator.alpha is None:
        translator.alpha = UNTUNED_ALPHA  # not tuned, as logged above: no warning about it while testing
    if test is not None:
        report = score_test(translator, test, output_dir, settings)
        fields.update(test_bleu=report.scores.bleu, test_seconds=report.seconds)
        print(
            f"Test split ({test.origin}), beam {settings.beam}, alpha {translator.settings(settings).alpha},"
            f" {translator.precision}, checkpoint {checkpoint}:\n{report}"
        )
        if test_mixture := (mixtures or {}).get("test"):
            hypotheses = read_lines(output_dir / "test.hyp")
            by_corpus = scores_by_corpus(hypotheses, test.tgt, *test_mixture, evaluate.bleu_tokenize)
            for name, scores in by_corpus.items():
                print(
                    f"Test split, corpus {name}: BLEU {scores.bleu:.2f}, chrF {scores.chrf:.2f}"
                    f" ({scores.bleu_signature})"
                )
            fields["test_bleu_by_corpus"] = {name: scores.bleu for name, scores in by_corpus.items()}
            fields["test_bleu"] = mean_over_corpora(by_corpus)[0]
            print(f"Test BLEU, mean over the {len(by_corpus)} corpora: {fields['test_bleu']:.2f}")
    return fields
