"""What the server tells about its model: ``GET /info`` (the model, its vocabulary, the decoding defaults,
the training data and BLEU) and the language pair that LibreTranslate's clients ask for."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from seq2seq.checkpoints import read_checkpoint
from seq2seq.data.corpora import BIBLE_LANGUAGES
from seq2seq.decoding import DecodingSettings
from seq2seq.translator import Translator

# English names of the ISO 639-1 codes our corpora use, for LibreTranslate's GET /languages.
LANGUAGE_NAMES = {
    "ar": "Arabic", "bn": "Bengali", "cs": "Czech", "de": "German", "el": "Greek", "en": "English",
    "es": "Spanish", "fa": "Persian", "fi": "Finnish", "fr": "French", "he": "Hebrew", "hi": "Hindi",
    "hu": "Hungarian", "id": "Indonesian", "it": "Italian", "ja": "Japanese", "ko": "Korean",
    "la": "Latin", "nl": "Dutch", "pl": "Polish", "pt": "Portuguese", "ro": "Romanian", "ru": "Russian",
    "sv": "Swedish", "sw": "Swahili", "tl": "Tagalog", "tr": "Turkish", "uk": "Ukrainian",
    "vi": "Vietnamese", "zh": "Chinese",
}  # fmt: skip


def language_pair(
    translator: Translator, source: str | None, target: str | None
) -> tuple[str | None, str | None]:
    """(source, target) language codes: those given (``source_lang``, ``target_lang``), else the
    checkpoint's. The target is the training run's (``data.tgt_lang`` or the corpus reader's); the source
    is known for a Bible run (its version's language), else None."""
    corpus = translator.run_config.get("data", {}).get("corpus", {})
    if source is None and str(corpus.get("_target_", "")).endswith("load_bible"):
        source = BIBLE_LANGUAGES.get(str(corpus.get("src_version")))
    return source, target or translator.tgt_lang


def language_name(code: str) -> str:
    return LANGUAGE_NAMES.get(code, code)


def training_scores(path: Path, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The BLEU a checkpoint is known by: the training run's ``result.json`` (validation and test BLEU),
    where the checkpoint still sits in its run folder, and the validation BLEU of each length penalty
    tried for ``alpha=auto``."""
    scores: dict[str, Any] = {"validation_bleu": None, "test_bleu": None}
    result = path.resolve().parent.parent / "result.json"
    if result.is_file():
        try:
            record = json.loads(result.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # a run folder being written: its record is not there yet
            record = {}
        if record.get("checkpoint") and Path(record["checkpoint"]).resolve() == path.resolve():
            scores["validation_bleu"] = record.get("val_bleu")
            scores["test_bleu"] = record.get("test_bleu")
    choice = checkpoint.get("alpha_choice")
    if choice:
        scores["validation_bleu_by_alpha"] = {str(k): v for k, v in choice["bleu_by_alpha"].items()}
    return scores


def model_info(
    paths: list[str], translator: Translator, defaults: DecodingSettings, languages: tuple[str | None, ...]
) -> dict[str, Any]:
    """``GET /info``: per checkpoint its architecture, step, training data and BLEU; the vocabulary,
    the languages, the decoding defaults (``alpha`` as configured, ``length_penalty`` what ``auto``
    means for this model) and the precision."""
    checkpoints = []
    for path in paths:
        checkpoint = read_checkpoint(path, required=("hyper_parameters",))
        settings = checkpoint["hyper_parameters"]
        run_config = checkpoint.get("run_config") or {}
        checkpoints.append(
            {
                "path": str(Path(path).resolve()),
                "architecture": settings["model"],
                "step": checkpoint.get("global_step"),
                "training_data": run_config.get("data", {}).get("corpus"),
                "scores": training_scores(Path(path), checkpoint),
            }
        )
    tokenizer = translator.tokenizer
    return {
        "checkpoints": checkpoints,
        "ensemble": len(paths) > 1,
        "parameters": sum(p.numel() for p in translator.model.parameters()),
        "attention": has_attention(translator),
        "vocabulary": {
            "source": tokenizer.src_vocab_size,
            "target": tokenizer.tgt_vocab_size,
            "joint": tokenizer.joint,
            "max_source_subwords": translator.max_src_len,
        },
        "languages": {"source": languages[0], "target": languages[1]},
        "decoding": {**asdict(defaults), "length_penalty": translator.settings(defaults).alpha},
        "precision": translator.precision,
        "device": str(translator.device),
    }


def has_attention(translator: Translator) -> bool:
    """Whether :meth:`Translator.align` works: a single model trained with attention."""
    decoder = getattr(translator.model, "decoder", None)  # an Ensemble has none
    return decoder is not None and decoder.attention is not None
