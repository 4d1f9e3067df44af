"""The LightningDataModule: prepares the data once (sentencepiece and encoded ids, cached on disk),
then reads it from there and batches it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import (
    LightningEnvironment,
    LSFEnvironment,
    MPIEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)
from torch.utils.data import DataLoader

from seq2seq.data.corpora import ConcatenatedText, Corpus, ParallelText
from seq2seq.data.encoded import EncodedSplit
from seq2seq.data.mixture import MixtureSplit
from seq2seq.data.prepared.cache import build_or_reuse, wait_for_prepared
from seq2seq.data.prepared.format import open_prepared
from seq2seq.data.prepared.read_ahead import memory_available, read_ahead
from seq2seq.data.sampler import (
    CorpusMixture,
    ResumableDataLoader,
    TokenBucketBatchSampler,
    padding_efficiency,
)
from seq2seq.data.sampling import EpochTaggedSampler, ResampledSplit, SamplingSettings
from seq2seq.errors import UserError, is_int, is_number
from seq2seq.private_apis import batches_done_in_epoch, resume_at_batch_of_epoch
from seq2seq.tokenization import SubwordSettings, Tokenizer

log = logging.getLogger(__name__)


class TranslationDataModule(L.LightningDataModule):
    """Owns the data side of a run.

    :meth:`prepare_data` builds the prepared cache (:mod:`seq2seq.data.prepared`) if no process has:
    sentencepiece trained on a seeded sample of the training split, every split encoded in chunks.
    :meth:`setup` opens it: batches read their ids from the OS page cache, which every process (DDP
    ranks, DataLoader workers) shares, so no split's ids are held in Python objects; for training, one
    process a node first reads the training ids into that cache in the background. ``texts[split]``
    holds the raw text of the kept pairs of each split the corpus holds in memory: validation and
    test always (BLEU needs them), training too for the Bible and synthetic corpora, never for files.

    Args:
        corpus: a callable returning the :class:`Corpus` (a Hydra ``_partial_`` of a reader).
        subword: :class:`SubwordSettings` fields for sentencepiece.
        batch_tokens: padded-token budget of a training batch (batch size x longest pair).
        max_len: training pairs with a side longer than this many subwords are dropped; validation and
            test pairs are truncated to it instead, so their scores cover every pair.
        cache_dir: where the prepared data is cached.
        seed: seed of the per-epoch batch shuffling.
        eval_batch_tokens: token budget for validation batches (defaults to ``2 * batch_tokens``).
        equal_source_length: training batches hold one source length only, so the encoder needs no
            packing (twice as fast on CPU); validation batches mix lengths to stay large.
        num_workers: DataLoader worker processes.
        pin_memory: batches in page-locked memory, so that copying them to a GPU does not wait.
        prepare_per_node: Lightning's ``prepare_data_per_node``: true when each node has its own
            ``cache_dir`` (each node's first process prepares), false for one shared by all nodes.
        prepare_wait_seconds: how long the other processes wait for the one that prepares, at most
            (None: no limit); they give up sooner if it stops without finishing.
        tgt_lang: the target language (ISO 639-1), for BLEU's tokenizer; None: the corpus reader's
            (the Bible knows each version's), else unknown. Known after ``setup`` as ``self.tgt_lang``.
        subword_sampling: None, or :class:`SamplingSettings` fields: each training batch is segmented
            anew from its text by sentencepiece's sampling (:mod:`seq2seq.data.sampling`).
        given_tokenizer: encode with these sentencepiece model(s) instead of training them on the corpus
            (fine-tuning: the checkpoint's); ``subword`` is then unused.
    """

    def __init__(
        self,
        corpus: Callable[[], Corpus],
        subword: dict[str, Any],
        batch_tokens: int,
        max_len: int,
        cache_dir: str,
        seed: int = 0,
        eval_batch_tokens: int | None = None,
        equal_source_length: bool = True,
        num_workers: int = 0,
        pin_memory: bool = False,
        prepare_per_node: bool = True,
        prepare_wait_seconds: float | None = 6 * 3600,
        tgt_lang: str | None = None,
        subword_sampling: dict[str, Any] | None = None,
        given_tokenizer: Tokenizer | None = None,
    ) -> None:
        super().__init__()
        if not is_int(max_len) or max_len < 1:
            raise UserError(f"data.max_len must be a positive integer, got {max_len!r}")
        if not is_int(batch_tokens) or batch_tokens < max_len + 1:
            raise UserError(
                f"data.batch_tokens={batch_tokens} cannot hold one pair of data.max_len={max_len} subwords;"
                f" raise data.batch_tokens to at least {max_len + 1}"
            )
        self.load_corpus = corpus
        self.subword = SubwordSettings(**subword)
        self.batch_tokens = batch_tokens
        self.eval_batch_tokens = eval_batch_tokens or 2 * batch_tokens
        self.max_len = max_len
        self.equal_source_length = equal_source_length
        self.cache_dir = cache_dir
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prepare_data_per_node = prepare_per_node
        if prepare_wait_seconds is not None and not (
            is_number(prepare_wait_seconds) and prepare_wait_seconds > 0
        ):
            raise UserError(
                "data.prepare_wait_seconds must be a number of seconds > 0 or null,"
                f" got {prepare_wait_seconds!r}"
            )
        self.prepare_wait_seconds = prepare_wait_seconds
        self.tgt_lang = tgt_lang
        self.sampling = SamplingSettings(**subword_sampling) if subword_sampling else None
        self.resampled: ResampledSplit | None = None
        self.given_tokenizer = given_tokenizer
        self.corpus: Corpus | None = None
        self.tokenizer: Tokenizer | None = None
        self.splits: dict[str, EncodedSplit] = {}
        # Raw text of the kept pairs of the splits held in memory, aligned with ``self.splits``.
        self.texts: dict[str, ParallelText] = {}
        self.reading_ahead: threading.Thread | None = None
        self.prepared: Path | None = None  # the prepared cache folder, once built or found
        # A mixture of corpora (data=corpora): the corpus of each kept pair per split, and the draw of
        # each training epoch's pairs by weight. None for a single corpus.
        self.corpus_ids: dict[str, np.ndarray | None] = {}
        self.mixture: CorpusMixture | None = None

    def prepare_data(self) -> None:
        """Build the prepared cache, unless it is up to date (then only check it). Lightning calls this
        in the processes that prepare (:meth:`prepares_here`); so does :meth:`setup` there, if nothing
        has (``train()`` sets up the data before the Trainer exists)."""
        if self.prepared is None:
            self.prepared = self.build_or_reuse_cache()

    def build_or_reuse_cache(self) -> Path:
        """The prepared cache folder: checked and reused if up to date, else built now."""
        # Under a lock: a process that finds the cache being built waits, then reuses it.
        return build_or_reuse(*self._what_names_the_cache())

    def _what_names_the_cache(self) -> tuple[Corpus, SubwordSettings, int, str, Tokenizer | None]:
        """The arguments of :func:`build_or_reuse` (the corpus read now if it was not yet): the corpus,
        the subword settings (with the corpora's tags), max_len, cache_dir, a given tokenizer."""
        if self.corpus is None:
            self.corpus = self.load_corpus()
        tags = self.corpus.tags
        if self.given_tokenizer is not None:
            self.given_tokenizer.check_tags(tags, "data.corpus.corpora.*.tag (init_from's vocabulary)")
        settings = replace(self.subword, user_defined_symbols=tags) if tags else self.subword
        return self.corpus, settings, self.max_len, self.cache_dir, self.given_tokenizer

    def ranks(self) -> tuple[int, int]:
        """(local rank, node rank) of this process: the Trainer's, or before there is one, what the
        environment says as Lightning reads it (torchrun, SLURM, LSF, MPI, or its own launcher's
        LOCAL_RANK and NODE_RANK)."""
        if self.trainer is not None:
            return self.trainer.local_rank, self.trainer.node_rank
        return process_ranks()

    def prepares_here(self) -> bool:
        """Whether this process prepares the data: local rank 0 of each node with ``prepare_per_node``
        (Lightning's ``prepare_data_per_node``), else global rank 0 only."""
        local_rank, node_rank = self.ranks()
        return local_rank == 0 and (self.prepare_data_per_node or node_rank == 0)

    def setup(self, stage: str | None = None) -> None:
        """Open the prepared cache: prepared first if this process prepares and has not (a caller that
        skipped :meth:`prepare_data`), else waited for until the process that prepares it has."""
        if self.tokenizer is not None:
            return
        if self.prepared is None and self.prepares_here():
            self.prepare_data()
        elif self.prepared is None:
            node_rank = self.ranks()[1]
            preparer = f"local rank 0 of node {node_rank}" if self.prepare_data_per_node else "global rank 0"
            self.prepared = wait_for_prepared(
                *self._what_names_the_cache(), preparer=preparer, limit_seconds=self.prepare_wait_seconds
            )
        prepared = open_prepared(self.prepared)
        self.tokenizer = prepared.tokenizer
        self.splits = {name: EncodedSplit(src, tgt) for name, (src, tgt) in prepared.ids.items()}
        self.tgt_lang = self.tgt_lang or self.corpus.tgt_lang
        self.corpus_ids = prepared.corpus_ids
        for name, split in self.splits.items():
            text = getattr(self.corpus, name)
            if isinstance(text, ConcatenatedText):
                text = text.in_memory() or text
            if not split:
                read = prepared.counts[name]["read"]
                raise UserError(f"{text.origin}: no usable pairs in the {name} split ({read} read)")
            if isinstance(text, ParallelText):
                kept = prepared.kept[name].tolist()
                self.texts[name] = ParallelText(
                    [text.src[i] for i in kept], [text.tgt[i] for i in kept], text.origin
                )
            if name == "train" and self.corpus_ids["train"] is not None:
                self.mixture = self._mixture(self.corpus_ids["train"])
            self._log_split(name, text.origin, split, prepared.counts[name])
        if self.sampling is not None:
            text = self.texts.get("train", self.corpus.train)
            if self.tokenizer.src_tags or isinstance(text, ConcatenatedText):
                raise UserError(
                    "data.subword_sampling is not available with target-language tags or with several"
                    " training corpora read from files"
                )
            self.resampled = ResampledSplit(
                self.splits["train"],
                text,
                prepared.kept["train"],
                self.tokenizer,
                self.sampling,
                self.max_len,
                self.seed,
            )
        # One process a node fills the page cache that the others, and their workers, read from.
        if stage in (None, "fit") and self.ranks()[0] == 0:
            self.reading_ahead = read_ahead(self.splits["train"].cache_files(), memory_available())

    def text(self, split: str) -> ParallelText | None:
        """The raw text of ``split``'s kept pairs (row i is the pair of index i in its batches); None for
        a split not held in memory (the training split of several corpora read from files)."""
        return self.texts.get(split)

    def mixture_split(self, split: str) -> MixtureSplit | None:
        """For a mixture of corpora, ``split``'s corpus of each kept pair with each corpus's name and
        target language; None for a single corpus."""
        corpus_ids = self.corpus_ids.get(split)
        if corpus_ids is None:
            return None
        corpora = [(part.name, part.tgt_lang or self.tgt_lang) for part in self.corpus.parts]
        return corpus_ids.tolist(), corpora

    def _mixture(self, corpus_ids: np.ndarray) -> CorpusMixture:
        """The draw of each epoch's training pairs by the corpora's weights; says what each epoch holds."""
        parts = self.corpus.parts
        mixture = CorpusMixture(corpus_ids, [part.weight for part in parts], self.seed)
        for part, members, count in zip(parts, mixture.members, mixture.counts.tolist(), strict=True):
            if not len(members):
                raise UserError(f"data.corpus.corpora.{part.name}: no usable training pairs")
            log.info(
                "Corpus %s: %d training pairs, weight %g: %d pairs an epoch (%.2fx); tag %s; target %s",
                part.name,
                len(members),
                part.weight,
                count,
                count / len(members),
                part.tag,
                part.tgt_lang,
            )
        return mixture

    def _log_split(self, name: str, origin: str, split: EncodedSplit, counts: dict[str, int]) -> None:
        """Say what was read, dropped and truncated, and how well the batches fill."""
        plan = self._batch_sampler(split, name).plan(epoch=0)
        src_eff, tgt_eff = padding_efficiency(split.src_lengths(), split.tgt_lengths(), plan)
        log.info(
            "%s split (%s): %d pairs read, %d dropped (%d with an empty side, %d longer than"
            " data.max_len=%d subwords), %d truncated to data.max_len; %d kept in %d batches;"
            " real-token fraction of padded batches: source %.3f, target %.3f",
            name, origin, counts["read"], counts["empty"] + counts["too_long"], counts["empty"],
            counts["too_long"], self.max_len, counts["truncated"], len(split), len(plan), src_eff, tgt_eff,
        )  # fmt: skip

    def _batch_sampler(self, split: EncodedSplit, name: str) -> TokenBucketBatchSampler:
        is_train = name == "train"
        trainer = self.trainer
        resampled = is_train and self.sampling is not None
        return (EpochTaggedSampler if resampled else TokenBucketBatchSampler)(
            split.src_lengths(),
            split.tgt_lengths(),
            self.batch_tokens if is_train else self.eval_batch_tokens,
            shuffle=is_train,
            seed=self.seed,
            epoch_fn=self._current_epoch,
            equal_source_length=is_train and self.equal_source_length,
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
            epoch_pairs=self.mixture.draw if is_train and self.mixture is not None else None,
        )

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _batches_done(self) -> int:
        return batches_done_in_epoch(self.trainer)

    def _resume_count(self, count: int) -> None:
        resume_at_batch_of_epoch(self.trainer, count)

    def _loader(self, name: str) -> DataLoader:
        split = self.splits[name]
        sampler = self._batch_sampler(split, name)
        if sampler.repeated_batches:
            log.info(
                "%s: %d of %d batches repeat each epoch so that each of the %d processes gets %d",
                name, sampler.repeated_batches, sampler.num_global_batches, sampler.num_replicas,
                len(sampler),
            )  # fmt: skip
        options = {
            "batch_sampler": sampler,
            "collate_fn": split.collate,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": self.pin_memory,
        }
        if name == "train":
            dataset = split if self.resampled is None else self.resampled  # resampled: segmented anew
            options["collate_fn"] = dataset.collate
            return ResumableDataLoader(
                dataset, batches_done_fn=self._batches_done, resume_count_fn=self._resume_count, **options
            )
        # A loader draws its workers' base seed from its generator each time it is iterated: from the
        # global stream without one, which would shift training's dropout after each validation.
        return DataLoader(split, generator=torch.Generator().manual_seed(self.seed), **options)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid")


def process_ranks() -> tuple[int, int]:
    """(local rank, node rank) of this process from its environment, before a Trainer exists: read by
    the cluster environment that the Trainer will choose (Lightning's order of detection)."""
    for environment in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment):
        if environment.detect():
            found = environment()
            return found.local_rank(), found.node_rank()
    return LightningEnvironment().local_rank(), LightningEnvironment().node_rank()
