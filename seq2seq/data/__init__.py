"""Data: corpus readers, the prepared cache, collation, the training sampler and the LightningDataModule.

This file imports nothing: importing any module of the package runs it first, and the translator's
readers (:mod:`seq2seq.data.text`, :mod:`seq2seq.data.collate`) must load without Lightning or the
training data code. The names below stay reachable as ``seq2seq.data.NAME`` (users' configs'
``_target_`` values, checkpoints' stored configs), imported from their module on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import Any

HOMES = {
    "Batch": "seq2seq.data.collate",
    "Corpus": "seq2seq.data.corpora",
    "EncodedSplit": "seq2seq.data.encoded",
    "ParallelFiles": "seq2seq.data.corpora",
    "ParallelText": "seq2seq.data.corpora",
    "RaggedIds": "seq2seq.data.prepared.format",
    "TokenBucketBatchSampler": "seq2seq.data.sampler",
    "TranslationDataModule": "seq2seq.data.datamodule",
    "load_bible": "seq2seq.data.corpora",
    "load_bible_many_to_one": "seq2seq.data.mixture",
    "load_corpora": "seq2seq.data.mixture",
    "load_files": "seq2seq.data.corpora",
    "load_synthetic": "seq2seq.data.corpora",
}

__all__ = list(HOMES)


def __getattr__(name: str) -> Any:
    if name not in HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(HOMES[name]), name)
