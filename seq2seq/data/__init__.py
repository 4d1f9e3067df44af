"""Data: corpus readers, batching and the LightningDataModule."""

from seq2seq.data.batching import Batch, EncodedSplit, RaggedIds, TokenBucketBatchSampler
from seq2seq.data.corpora import Corpus, ParallelFiles, ParallelText, load_bible, load_files, load_synthetic
from seq2seq.data.datamodule import TranslationDataModule

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
    "load_files",
    "load_synthetic",
]
