"""Subword tokenization with sentencepiece: training, caching and the special token ids.

This module is the one place that defines the ids of padding, unknown, begin- and end-of-sentence.
A trained :class:`Tokenizer` serializes to bytes, so checkpoints carry it and need no other file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import sentencepiece as spm

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


@dataclass(frozen=True)
class SubwordSettings:
    """How to train the sentencepiece model(s); every field is part of the cache key."""

    vocab_size: int = 8000
    model_type: str = "unigram"  # unigram | bpe | char | word
    character_coverage: float = 1.0
    joint: bool = True  # one vocabulary for both sides, or one per side
    byte_fallback: bool = False
    input_sentence_size: int = 2_000_000

    def __post_init__(self) -> None:
        if self.vocab_size < 8:
            raise ValueError(f"data.subword.vocab_size must be at least 8, got {self.vocab_size}")
        if self.model_type not in ("unigram", "bpe", "char", "word"):
            raise ValueError(
                f"data.subword.model_type must be unigram, bpe, char or word, got {self.model_type!r}"
            )
        if not 0.0 < self.character_coverage <= 1.0:
            raise ValueError(
                f"data.subword.character_coverage must be in (0, 1], got {self.character_coverage}"
            )


class Tokenizer:
    """Source and target sentencepiece processors (the same one when the vocabulary is joint)."""

    def __init__(self, src_model: bytes, tgt_model: bytes | None = None) -> None:
        self.src_model = src_model
        self.tgt_model = tgt_model
        self.src = spm.SentencePieceProcessor(model_proto=src_model)
        self.tgt = self.src if tgt_model is None else spm.SentencePieceProcessor(model_proto=tgt_model)

    @property
    def joint(self) -> bool:
        return self.tgt_model is None

    @property
    def src_vocab_size(self) -> int:
        return self.src.get_piece_size()

    @property
    def tgt_vocab_size(self) -> int:
        return self.tgt.get_piece_size()

    def encode_src(self, lines: Sequence[str]) -> list[list[int]]:
        return self.src.encode(list(lines))

    def encode_tgt(self, lines: Sequence[str]) -> list[list[int]]:
        return self.tgt.encode(list(lines))

    def decode_tgt(self, ids: Sequence[Sequence[int]]) -> list[str]:
        return self.tgt.decode([list(seq) for seq in ids])

    def state_dict(self) -> dict[str, bytes | None]:
        """Serialized models, as stored inside checkpoints."""
        return {"src_model": self.src_model, "tgt_model": self.tgt_model}

    @classmethod
    def from_state_dict(cls, state: dict[str, bytes | None]) -> Tokenizer:
        return cls(state["src_model"], state["tgt_model"])


def _train_one(lines: Iterable[str], settings: SubwordSettings, out_path: Path) -> None:
    """Train one sentencepiece model on ``lines`` and write it atomically to ``out_path``."""
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("".join(line + "\n" for line in lines if line.strip()), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(Path(tmp) / "sp"),
            vocab_size=settings.vocab_size,
            model_type=settings.model_type,
            character_coverage=settings.character_coverage,
            byte_fallback=settings.byte_fallback,
            input_sentence_size=settings.input_sentence_size,
            shuffle_input_sentence=True,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            # A vocabulary too large for a small corpus is lowered rather than failing.
            hard_vocab_limit=False,
            minloglevel=2,
            num_threads=os.cpu_count() or 1,
        )
        os.replace(Path(tmp) / "sp.model", out_path)


def cache_key(src_lines: Sequence[str], tgt_lines: Sequence[str], settings: SubwordSettings) -> str:
    """A digest of the training text and the settings: equal keys give equal models."""
    digest = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode())
    for side in (src_lines, tgt_lines):
        digest.update(b"\x00side\x00")
        for line in side:
            digest.update(line.encode("utf-8", "surrogatepass") + b"\n")
    return digest.hexdigest()[:16]


def train_or_load(
    src_lines: Sequence[str], tgt_lines: Sequence[str], settings: SubwordSettings, cache_dir: str | Path
) -> Tokenizer:
    """Train sentencepiece on the training split, or reuse the cached model of the same data and settings."""
    folder = Path(cache_dir) / "sentencepiece" / cache_key(src_lines, tgt_lines, settings)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "joint.model"] if settings.joint else [folder / "src.model", folder / "tgt.model"]
    # Processes started together (DDP ranks under torchrun or SLURM) train once: the others wait here.
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all(path.exists() for path in paths):
            log.info("Reusing cached sentencepiece model(s) from %s", folder)
        else:
            log.info("Training sentencepiece (%s) into %s", settings, folder)
            if settings.joint:
                _train_one([*src_lines, *tgt_lines], settings, paths[0])
            else:
                _train_one(src_lines, settings, paths[0])
                _train_one(tgt_lines, settings, paths[1])
        models = [path.read_bytes() for path in paths]
    return Tokenizer(models[0], None if settings.joint else models[1])
