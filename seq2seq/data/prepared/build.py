"""Building a prepared folder (laid out as :mod:`seq2seq.data.prepared.format` says): sentencepiece
trained on a seeded sample of the training split (unless the model(s) are given), every split read in
chunks and encoded, ``manifest.json`` written last, atomically."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from seq2seq.data.corpora import SPLITS, ConcatenatedText, Corpus
from seq2seq.data.prepared.format import FORMAT, SplitWriter
from seq2seq.errors import UserError
from seq2seq.tokenization import SubwordSamples, SubwordSettings, Tokenizer

log = logging.getLogger(__name__)

CHUNK_LINES = 100_000  # lines read and encoded at a time


def subword_identity(settings: SubwordSettings, tokenizer: Tokenizer | None) -> dict[str, Any]:
    """What names the subword model(s): the settings to train them with, or the given model(s)."""
    return asdict(settings) if tokenizer is None else {"given": tokenizer.digest()}


def this_build() -> str:
    """The owner part of a temporary name (a build's folder, a manifest being written): ``<host>-<pid>``."""
    return f"{socket.gethostname()}-{os.getpid()}"


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest`` to ``path`` atomically: readers see the old file or the new one, whole."""
    partial = path.with_name(f"{path.name}.tmp-{this_build()}")
    with open(partial, "w", encoding="utf-8") as out:
        json.dump(manifest, out, indent=1)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)


def build(
    corpus: Corpus, settings: SubwordSettings, max_len: int, folder: Path, tokenizer: Tokenizer | None = None
) -> None:
    """Train sentencepiece on a seeded sample of the training split (unless ``tokenizer`` is given),
    then encode every split into ``folder``, reading each in chunks; ``manifest.json`` is written last."""
    started = time.perf_counter()
    subword = subword_identity(settings, tokenizer)  # before a tokenizer is trained
    watched = corpus.train.files
    stats = {path: path.stat() for path in watched}
    digests = None  # of the watched files' bytes: taken by the sampling pass, else by the encoding pass
    if tokenizer is None:
        digests = {path: hashlib.sha256() for path in watched}
        samples = SubwordSamples(settings)
        for src, tgt in corpus.train.chunks(CHUNK_LINES, digests):
            samples.add(src, tgt)
        log.info(
            "Training sentencepiece (%s) on %d sampled lines of %d", settings,
            len(samples.src.lines) + (0 if settings.joint else len(samples.tgt.lines)),
            samples.src.seen + (0 if settings.joint else samples.tgt.seen),
        )  # fmt: skip
        tokenizer = samples.train(corpus.train.origin)
    sampled = time.perf_counter()
    models = {"joint.model": tokenizer.src_model} if tokenizer.joint else {
        "src.model": tokenizer.src_model, "tgt.model": tokenizer.tgt_model,
    }  # fmt: skip
    for name, model in models.items():
        (folder / name).write_bytes(model)
    id_type = np.uint16 if max(tokenizer.src_vocab_size, tokenizer.tgt_vocab_size) <= 2**16 else np.int32
    splits = {}
    for name in SPLITS:
        if (text := getattr(corpus, name)) is None:
            continue
        check = {path: hashlib.sha256() for path in watched} if name == "train" else None
        writer = SplitWriter(folder, name, id_type, max_len, truncate=name != "train")
        part_ends = []  # pairs read up to the end of each corpus of a mixture
        for part in text.parts if isinstance(text, ConcatenatedText) else [text]:
            for src, tgt in part.chunks(CHUNK_LINES, check):
                writer.add(tokenizer.encode_arrays(src, "src"), tokenizer.encode_arrays(tgt, "tgt"))
            part_ends.append(writer.counts["read"])
        splits[name] = {**writer.close(), "part_ends": part_ends}
        if check is not None and digests is None:
            digests = check
        elif check is not None and any(check[p].digest() != digests[p].digest() for p in watched):
            raise UserError(f"{text.origin} changed while it was being prepared; run again")
    inputs = [
        {"path": str(path.resolve()), "size": stats[path].st_size, "mtime_ns": stats[path].st_mtime_ns,
         "sha256": digests[path].hexdigest()}
        for path in watched
    ]  # fmt: skip
    manifest = {
        "format": FORMAT,
        "subword": subword,
        "max_len": max_len,
        "id_type": np.dtype(id_type).name,
        "inputs": inputs,
        "splits": splits,
        "origins": {name: getattr(corpus, name).origin for name in splits},
        "seconds": {"sentencepiece": sampled - started, "total": time.perf_counter() - started},
        "files": {path.name: path.stat().st_size for path in folder.iterdir()},
    }
    write_manifest(folder / "manifest.json", manifest)
