"""The on-disk format of a prepared cache folder: :class:`SplitWriter` writes a split,
:class:`RaggedIds` reads one side of it, :func:`open_prepared` opens the whole folder.

A folder holds per split and side (fairseq's layout) a flat array of ids (``.ids``: uint16 when the
vocabulary allows, else int32), their ``.offsets`` (int64, one more than the pairs) and ``.lengths``
(int32), plus ``<split>.kept`` (int64: where each kept pair was in the raw split), the model file(s), and
``manifest.json``: settings, counts, the watched input files (size, mtime and SHA-256 of their bytes,
taken while reading them), written last.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seq2seq.errors import UserError
from seq2seq.tokenization import PAD_ID, Tokenizer

FORMAT = 1  # bump when the layout or the encoding changes
SIDES = ("src", "tgt")


def map_array(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    """``count`` values of ``dtype`` in ``path``, memory-mapped read-only (an empty file maps to [])."""
    if count == 0:
        return np.zeros(0, dtype)
    with path.open("rb") as stream:  # the mapping outlives the file descriptor
        mapping = mmap.mmap(stream.fileno(), 0, prot=mmap.PROT_READ)
    return np.frombuffer(mapping, dtype=dtype, count=count)


def every_nth(path: Path, count: int, n: int, chunk: int = 1 << 20) -> np.ndarray:
    """Values 0, n, 2n, ... of the ``count`` int64 values in ``path``, read a chunk at a time."""
    chunk -= chunk % n  # so that each chunk starts at a multiple of n
    parts = []
    with path.open("rb") as stream:
        for first in range(0, count, chunk):
            values = np.fromfile(stream, np.int64, count=min(chunk, count - first))
            if len(values) < min(chunk, count - first):
                raise UserError(f"{path}: {first + len(values)} values, expected {count}")
            parts.append(values[::n])
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


class RaggedIds:
    """Id sequences of varying length stored flat: sequence i is ``ids[offsets[i]:offsets[i + 1]]``.

    Either in memory (:meth:`from_lists`) or in a prepared cache folder (:meth:`open`). From the cache,
    each sequence is read with ``pread``: from the OS page cache, which every process shares (DDP ranks,
    DataLoader workers, later runs), without mapping the file into this process. A memory map made each
    process's unique memory grow with the cache pages it had touched (the kernel maps whole page-cache
    folios, up to megabytes, per read). In memory are only the lengths (4 bytes a sequence) and every
    ``BLOCK``-th offset: a sequence starts at its block's offset plus the lengths before it in the block.
    Pickling one read from the cache (for spawned DataLoader workers) sends where it is, not the data.
    """

    BLOCK = 64

    def __init__(
        self,
        lengths: np.ndarray,
        block_offsets: np.ndarray,
        ids: np.ndarray | None,
        source: tuple | None = None,
    ) -> None:
        self.lengths, self.block_offsets, self.ids, self.source = lengths, block_offsets, ids, source
        if ids is None:  # read from the cache: source is (folder, name, id_type, count, tokens)
            folder, name, id_type, _, tokens = source
            self.path = folder / f"{name}.ids"
            self.id_type = np.dtype(id_type)
            self.file = self.path.open("rb")  # pread needs no seek: forked workers may share it
            size = os.fstat(self.file.fileno()).st_size
            if size != tokens * self.id_type.itemsize:
                raise UserError(f"{self.path}: {size} bytes, expected {tokens} ids of {self.id_type}")

    @classmethod
    def from_lists(cls, sequences: Sequence[Sequence[int]]) -> RaggedIds:
        lengths = np.fromiter(map(len, sequences), dtype=np.int32, count=len(sequences))
        ids = np.fromiter((i for seq in sequences for i in seq), dtype=np.int32, count=int(lengths.sum()))
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        return cls(lengths, offsets[:: cls.BLOCK].copy(), ids)

    @classmethod
    def open(cls, folder: Path, name: str, id_type: np.dtype, count: int, tokens: int) -> RaggedIds:
        """The ``count`` sequences (``tokens`` ids) of ``name`` in a prepared cache folder."""
        lengths = np.fromfile(folder / f"{name}.lengths", np.int32, count=count)
        if len(lengths) != count:
            raise UserError(f"{folder / name}.lengths: {len(lengths)} lengths, expected {count}")
        block_offsets = every_nth(folder / f"{name}.offsets", count + 1, cls.BLOCK)
        return cls(lengths, block_offsets, None, source=(folder, name, id_type, count, tokens))

    def __len__(self) -> int:
        return len(self.lengths)

    def starts(self, indices: np.ndarray) -> np.ndarray:
        """(len(indices),) int64: where each sequence's ids begin in the flat array."""
        indices = np.asarray(indices, dtype=np.int64)
        first = indices - indices % self.BLOCK
        columns = np.arange(self.BLOCK)
        block = np.minimum(first[:, None] + columns, len(self.lengths) - 1)  # past the end: masked below
        before = np.where(columns < (indices - first)[:, None], self.lengths[block], 0).sum(axis=1)
        return self.block_offsets[indices // self.BLOCK] + before

    def read(self, start: int, length: int) -> np.ndarray:
        """The ``length`` ids from position ``start`` of the flat array."""
        if self.ids is not None:
            return self.ids[start : start + length]
        size = self.id_type.itemsize
        data = os.pread(self.file.fileno(), length * size, start * size)
        if len(data) != length * size:
            raise UserError(f"{self.path}: ended before id {start + length} (the file changed?)")
        return np.frombuffer(data, self.id_type)

    def __getitem__(self, index: int) -> list[int]:
        return self.read(int(self.starts(np.array([index]))[0]), int(self.lengths[index])).tolist()

    def padded(self, indices: np.ndarray, width: int) -> np.ndarray:
        """(len(indices), width) int64 ids of the given sequences, PAD_ID after each one's end."""
        out = np.full((len(indices), width), PAD_ID, dtype=np.int64)
        lengths = self.lengths[indices].tolist()
        for row, (start, length) in enumerate(zip(self.starts(indices).tolist(), lengths, strict=True)):
            out[row, :length] = self.read(start, length)
        return out

    def __getstate__(self) -> dict[str, Any]:
        if self.source is None:
            return self.__dict__
        return {"source": self.source}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "ids" in state:
            self.__dict__.update(state)
        else:
            self.__dict__.update(RaggedIds.open(*state["source"]).__dict__)


class SplitWriter:
    """Appends encoded chunks of one split to its files, dropping (training) or truncating pairs."""

    def __init__(self, folder: Path, name: str, id_type: type, max_len: int, truncate: bool) -> None:
        self.name, self.id_type, self.max_len, self.truncate = name, id_type, max_len, truncate
        self.stack = ExitStack()  # closed by close(), or by build()'s cleanup of the folder
        names = [f"{side}.{kind}" for side in SIDES for kind in ("ids", "offsets", "lengths")] + ["kept"]
        self.files = {
            name_: self.stack.enter_context((folder / f"{name}.{name_}").open("wb")) for name_ in names
        }
        self.ends = {side: 0 for side in SIDES}
        for side in SIDES:
            self.files[f"{side}.offsets"].write(np.zeros(1, np.int64).tobytes())
        self.counts = {"read": 0, "empty": 0, "too_long": 0, "truncated": 0, "kept": 0}

    def add(self, src: list[np.ndarray], tgt: list[np.ndarray]) -> None:
        lengths = {
            side: np.fromiter(map(len, ids), np.int64, len(ids))
            for side, ids in zip(SIDES, (src, tgt), strict=True)
        }
        empty = (lengths["src"] == 0) | (lengths["tgt"] == 0)
        long = ~empty & (np.maximum(lengths["src"], lengths["tgt"]) > self.max_len)
        kept = np.flatnonzero(~empty if self.truncate else ~empty & ~long)
        self.counts["read"] += len(src)
        self.counts["empty"] += int(empty.sum())
        self.counts["truncated" if self.truncate else "too_long"] += int(long.sum())
        self.counts["kept"] += len(kept)
        self.files["kept"].write((kept + self.counts["read"] - len(src)).astype(np.int64).tobytes())
        for side, ids in zip(SIDES, (src, tgt), strict=True):
            pieces = [ids[i][: self.max_len] for i in kept]
            kept_lengths = np.minimum(lengths[side][kept], self.max_len)
            flat = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
            self.files[f"{side}.ids"].write(flat.astype(self.id_type).tobytes())
            self.files[f"{side}.lengths"].write(kept_lengths.astype(np.int32).tobytes())
            self.files[f"{side}.offsets"].write((self.ends[side] + np.cumsum(kept_lengths)).tobytes())
            self.ends[side] += int(kept_lengths.sum())

    def close(self) -> dict[str, int]:
        for stream in self.files.values():
            stream.flush()
            os.fsync(stream.fileno())
        self.stack.close()
        return {**self.counts, "src_tokens": self.ends["src"], "tgt_tokens": self.ends["tgt"]}


@dataclass
class PreparedData:
    """A prepared cache, opened: the tokenizer, each split's (source, target) ids read from the cache,
    and its counts; for a mixture of corpora, the corpus (its position in the mixture) of each kept pair."""

    folder: Path
    tokenizer: Tokenizer
    ids: dict[str, tuple[RaggedIds, RaggedIds]]
    kept: dict[str, np.ndarray]  # where each kept pair was in the raw split
    counts: dict[str, dict[str, Any]]
    corpus_ids: dict[str, np.ndarray | None]  # (kept pairs,) int16; None for a single corpus


def open_prepared(folder: Path) -> PreparedData:
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    models = [
        (folder / name).read_bytes()
        for name in ("joint.model", "src.model", "tgt.model")
        if (folder / name).is_file()
    ]
    tokenizer = Tokenizer(models[0], models[1] if len(models) > 1 else None)
    id_type = np.dtype(manifest["id_type"])
    ids, kept, corpus_ids = {}, {}, {}
    for name, counts in manifest["splits"].items():
        pairs = counts["kept"]
        src, tgt = (
            RaggedIds.open(folder, f"{name}.{side}", id_type, pairs, counts[f"{side}_tokens"])
            for side in SIDES
        )
        ids[name] = (src, tgt)
        kept[name] = map_array(folder / f"{name}.kept", np.int64, pairs)
        ends = counts.get("part_ends", [])
        many = len(ends) > 1
        corpus_ids[name] = np.searchsorted(ends, kept[name], side="right").astype(np.int16) if many else None
    return PreparedData(folder, tokenizer, ids, kept, manifest["splits"], corpus_ids)
