"""Subword tokenization with sentencepiece: sampling and training, and the special token ids.

This module is the one place that defines the ids of padding, unknown, begin- and end-of-sentence.
A trained :class:`Tokenizer` serializes to bytes, so checkpoints carry it and need no other file.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from seq2seq.errors import UserError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# A target-language tag (``<2en>``): one token in angle brackets, kept whole by sentencepiece.
TAG_PATTERN = re.compile(r"<[^<>\s]+>")


@dataclass(frozen=True)
class SubwordSettings:
    """How to train the sentencepiece model(s); every field is part of the cache key."""

    vocab_size: int = 8000
    model_type: str = "unigram"  # unigram | bpe | char | word
    character_coverage: float = 1.0
    joint: bool = True  # one vocabulary for both sides, or one per side
    byte_fallback: bool = False
    input_sentence_size: int = 2_000_000  # lines sampled (seeded) from the training split per model
    sample_seed: int = 0  # seed of that sample and of sentencepiece's own sampling
    train_threads: int = 4  # sentencepiece's result depends on it, so it is a setting, not the core count
    # Pieces kept whole, such as target-language tags (``<2en>``); set from the corpora, not by users.
    user_defined_symbols: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.vocab_size < 8:
            raise UserError(f"data.subword.vocab_size must be at least 8, got {self.vocab_size}")
        if self.model_type not in ("unigram", "bpe", "char", "word"):
            raise UserError(
                f"data.subword.model_type must be unigram, bpe, char or word, got {self.model_type!r}"
            )
        if self.train_threads < 1:
            raise UserError(f"data.subword.train_threads must be positive, got {self.train_threads}")
        if not 0.0 < self.character_coverage <= 1.0:
            raise UserError(
                f"data.subword.character_coverage must be in (0, 1], got {self.character_coverage}"
            )


class Tokenizer:
    """Source and target sentencepiece processors (the same one when the vocabulary is joint)."""

    def __init__(self, src_model: bytes, tgt_model: bytes | None = None) -> None:
        self.src_model = src_model
        self.tgt_model = tgt_model
        self.src = spm.SentencePieceProcessor(model_proto=src_model)
        self.tgt = self.src if tgt_model is None else spm.SentencePieceProcessor(model_proto=tgt_model)
        # Target-language tags: the user-defined ``<...>`` pieces of the source vocabulary.
        pieces = sentencepiece_model_pb2.ModelProto.FromString(src_model).pieces
        user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
        self.src_tags = {
            piece.piece: i
            for i, piece in enumerate(pieces)
            if piece.type == user_defined and TAG_PATTERN.fullmatch(piece.piece)
        }

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
        return [ids.tolist() for ids in self.encode_arrays(lines, "src")]

    def encode_tgt(self, lines: Sequence[str]) -> list[list[int]]:
        return self.tgt.encode(list(lines))

    def encode_arrays(self, lines: Sequence[str], side: str) -> list[np.ndarray]:
        """Ids of each line as an int32 array, encoded on all cores (``side``: "src" or "tgt")."""
        processor = self.src if side == "src" else self.tgt
        if side == "tgt" or not self.src_tags:
            return processor.encode(list(lines), return_type="numpy", num_threads=-1)
        # A source line that starts with a tag and a space: the tag's id, then the rest's ids (encoded
        # whole, sentencepiece would put a word-boundary piece before the tag).
        tags = [-1] * len(lines)
        rest = list(lines)
        for row, line in enumerate(lines):
            tag, space, text = line.partition(" ")
            if space and tag in self.src_tags:
                tags[row], rest[row] = self.src_tags[tag], text
        encoded = processor.encode(rest, return_type="numpy", num_threads=-1)
        return [np.concatenate(([tag], ids)).astype(ids.dtype) if tag >= 0 else ids
                for tag, ids in zip(tags, encoded, strict=True)]  # fmt: skip

    def check_tags(self, tags: Sequence[str], option: str) -> None:
        """A ValueError naming ``option`` unless every tag is a tag of the source vocabulary."""
        if missing := [tag for tag in tags if tag not in self.src_tags]:
            known = sorted(self.src_tags) or "none"
            raise UserError(f"{option}: {missing} not in the vocabulary as tags (it has {known})")

    def decode_tgt(self, ids: Sequence[Sequence[int]]) -> list[str]:
        return self.tgt.decode([list(seq) for seq in ids])

    def digest(self) -> str:
        """SHA-256 of the serialized model(s): names this tokenizer in a prepared cache's key."""
        digest = hashlib.sha256(self.src_model)
        if self.tgt_model is not None:
            digest.update(b"\x00tgt\x00" + self.tgt_model)
        return digest.hexdigest()

    def state_dict(self) -> dict[str, bytes | None]:
        """Serialized models, as stored inside checkpoints."""
        return {"src_model": self.src_model, "tgt_model": self.tgt_model}

    @classmethod
    def from_state_dict(cls, state: dict[str, bytes | None]) -> Tokenizer:
        return cls(state["src_model"], state["tgt_model"])


class LineSample:
    """A seeded uniform sample of at most ``size`` non-blank lines, drawn while streaming (reservoir).

    The same lines in the same order and the same seed give the same sample, so every node that
    prepares the same corpus trains the same sentencepiece model.
    """

    def __init__(self, size: int, seed: int) -> None:
        if size < 1:
            raise UserError(f"data.subword.input_sentence_size must be positive, got {size}")
        self.size = size
        self.rng = np.random.default_rng(seed)
        self.lines: list[str] = []
        self.seen = 0  # non-blank lines offered so far

    def add(self, lines: Iterable[str]) -> None:
        lines = [line for line in lines if line.strip()]
        room = self.size - len(self.lines)
        self.lines.extend(lines[:room])
        rest = lines[max(room, 0) :]
        self.seen += min(len(lines), max(room, 0))
        if not rest:
            return
        # Line number k (0-based) replaces a random slot with probability size / (k + 1).
        slots = self.rng.integers(0, self.seen + np.arange(1, len(rest) + 1))
        for position in np.flatnonzero(slots < self.size):
            self.lines[slots[position]] = rest[position]
        self.seen += len(rest)


def train_model(lines: Sequence[str], settings: SubwordSettings) -> bytes:
    """Train one sentencepiece model on ``lines`` (already sampled) and return it serialized."""
    model = io.BytesIO()
    spm.set_random_generator_seed(settings.sample_seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=settings.vocab_size,
        model_type=settings.model_type,
        character_coverage=settings.character_coverage,
        byte_fallback=settings.byte_fallback,
        input_sentence_size=settings.input_sentence_size,
        user_defined_symbols=list(settings.user_defined_symbols),
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        # A vocabulary too large for a small corpus is lowered rather than failing.
        hard_vocab_limit=False,
        minloglevel=2,
        # Fixed, not the core count: the model depends on it, and every node must train the same one.
        num_threads=settings.train_threads,
    )
    return model.getvalue()


class SubwordSamples:
    """The training samples of the model(s) ``settings`` asks for, fed chunk by chunk."""

    def __init__(self, settings: SubwordSettings) -> None:
        self.settings = settings
        size, seed = settings.input_sentence_size, settings.sample_seed
        self.src = LineSample(size, seed)
        self.tgt = self.src if settings.joint else LineSample(size, seed + 1)

    def add(self, src_lines: Sequence[str], tgt_lines: Sequence[str]) -> None:
        self.src.add(src_lines)
        self.tgt.add(tgt_lines)

    def train(self, origin: str = "the training split") -> Tokenizer:
        if not self.src.lines or not self.tgt.lines:
            raise UserError(f"{origin}: no non-blank lines to train sentencepiece on")
        src_model = train_model(self.src.lines, self.settings)
        return Tokenizer(
            src_model, None if self.settings.joint else train_model(self.tgt.lines, self.settings)
        )


def train_tokenizer(
    src_lines: Sequence[str], tgt_lines: Sequence[str], settings: SubwordSettings
) -> Tokenizer:
    """Train sentencepiece on in-memory lines (training runs take theirs from the prepared data cache,
    :mod:`seq2seq.data.prepared`, which trains it once per corpus and settings)."""
    samples = SubwordSamples(settings)
    samples.add(src_lines, tgt_lines)
    return samples.train()
