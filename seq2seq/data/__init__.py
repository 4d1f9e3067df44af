"""Data: corpus readers, the prepared cache, collation, the training sampler and the LightningDataModule."""

from seq2seq.data.collate import Batch, EncodedSplit
from seq2seq.data.corpora import (
    Corpus,
    ParallelFiles,
    ParallelText,
    load_bible,
    load_bible_many_to_one,
    load_corpora,
    load_files,
    load_synthetic,
)
from seq2seq.data.datamodule import TranslationDataModule
from seq2seq.data.prepared.cache import RaggedIds
from seq2seq.data.sampler import TokenBucketBatchSampler

__all__ = [
    "Batch",
    "Corpus",
    "EncodedSplit",
    "ParallelFiles",
    "ParallelText",
    "RaggedIds",
    "TokenBucketBatchSampler",
    "TranslationDataModule",
    "load_bible",
    "load_bible_many_to_one",
    "load_corpora",
    "load_files",
    "load_synthetic",
]
