"""The LightningDataModule: reads a corpus, trains or reuses sentencepiece, filters, encodes, batches."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from seq2seq.data.batching import EncodedSplit, TokenBucketBatchSampler
from seq2seq.data.corpora import Corpus, ParallelText
from seq2seq.tokenization import SubwordSettings, Tokenizer, train_or_load

log = logging.getLogger(__name__)


class TranslationDataModule(L.LightningDataModule):
    """Owns the data side of a run.

    Args:
        corpus: a callable returning the :class:`Corpus` (a Hydra ``_partial_`` of a reader).
        subword: :class:`SubwordSettings` fields for sentencepiece.
        batch_tokens: padded-token budget of a training batch (batch size x longest pair).
        max_len: training pairs with a side longer than this many subwords are dropped; validation and
            test pairs are truncated to it instead, so their scores cover every pair.
        cache_dir: where trained sentencepiece models are cached.
        seed: seed of the per-epoch batch shuffling.
        eval_batch_tokens: token budget for validation batches (defaults to ``2 * batch_tokens``).
        equal_source_length: training batches hold one source length only, so the encoder needs no
            packing (twice as fast on CPU); validation batches mix lengths to stay large.
        num_workers: DataLoader worker processes.
        tgt_lang: the target language (ISO 639-1), for BLEU's tokenizer; None: the corpus reader's
            (the Bible knows each version's), else unknown. Known after ``setup`` as ``self.tgt_lang``.
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
        tgt_lang: str | None = None,
    ) -> None:
        super().__init__()
        if max_len < 1:
            raise ValueError(f"data.max_len must be positive, got {max_len}")
        if batch_tokens < max_len + 1:
            raise ValueError(
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
        self.tgt_lang = tgt_lang
        self.corpus: Corpus | None = None
        self.tokenizer: Tokenizer | None = None
        self.splits: dict[str, EncodedSplit] = {}
        # Raw text of the kept pairs of each split, aligned with ``self.splits``.
        self.texts: dict[str, ParallelText] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:
            return
        self.corpus = self.load_corpus()
        self.tgt_lang = self.tgt_lang or self.corpus.tgt_lang
        train = self.corpus.train
        self.tokenizer = train_or_load(train.src, train.tgt, self.subword, self.cache_dir)
        for name in ("train", "valid", "test"):
            if (text := getattr(self.corpus, name)) is not None:
                self.splits[name], self.texts[name] = self._encode(name, text)

    def _encode(self, name: str, text: ParallelText) -> tuple[EncodedSplit, ParallelText]:
        """Encode a split, drop empty pairs (and over-long training pairs), and log what was dropped."""
        assert self.tokenizer is not None
        src_ids = self.tokenizer.encode_src(text.src)
        tgt_ids = self.tokenizer.encode_tgt(text.tgt)
        is_train = name == "train"
        kept: list[int] = []
        empty = too_long = truncated = 0
        for i, (s, t) in enumerate(zip(src_ids, tgt_ids, strict=True)):
            if not s or not t:
                empty += 1
            elif max(len(s), len(t)) > self.max_len:
                if is_train:
                    too_long += 1
                    continue
                truncated += 1
                src_ids[i], tgt_ids[i] = s[: self.max_len], t[: self.max_len]
                kept.append(i)
            else:
                kept.append(i)
        split = EncodedSplit([src_ids[i] for i in kept], [tgt_ids[i] for i in kept])
        kept_text = ParallelText([text.src[i] for i in kept], [text.tgt[i] for i in kept], text.origin)
        if not split:
            raise ValueError(f"{text.origin}: no usable pairs in the {name} split ({len(text)} read)")
        batches = self._batch_sampler(split, name).batches(epoch=0)
        src_eff, tgt_eff = split.padding_efficiency(batches)
        log.info(
            "%s split (%s): %d pairs read, %d dropped (%d with an empty side, %d longer than"
            " data.max_len=%d subwords), %d truncated to data.max_len; %d kept in %d batches;"
            " real-token fraction of padded batches: source %.3f, target %.3f",
            name, text.origin, len(text), empty + too_long, empty, too_long, self.max_len,
            truncated, len(split), len(batches), src_eff, tgt_eff,
        )  # fmt: skip
        return split, kept_text

    def _batch_sampler(self, split: EncodedSplit, name: str) -> TokenBucketBatchSampler:
        is_train = name == "train"
        trainer = self.trainer
        return TokenBucketBatchSampler(
            split.src_lengths(),
            split.tgt_lengths(),
            self.batch_tokens if is_train else self.eval_batch_tokens,
            shuffle=is_train,
            seed=self.seed,
            epoch_fn=self._current_epoch,
            equal_source_length=is_train and self.equal_source_length,
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
        )

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _batches_done(self) -> int:
        """Training batches of the current epoch that went through a training step."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

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
        }
        if name == "train":
            return ResumableDataLoader(split, batches_done_fn=self._batches_done, **options)
        return DataLoader(split, **options)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid")


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position in the epoch goes into checkpoints.

    Lightning saves ``state_dict()`` with each checkpoint and, on resuming, calls ``load_state_dict``
    before iterating; the batch sampler then skips the batches already trained on, so a run stopped
    mid-epoch goes on with the next batch of the same epoch order. The position is the trainer's count
    of processed batches, not the loader's: the loader runs ahead of training by its prefetching.
    """

    def __init__(self, *args: Any, batches_done_fn: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done_fn = batches_done_fn

    def state_dict(self) -> dict[str, int]:
        return {"batches_done": self.batches_done_fn()}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        batches_done = state_dict["batches_done"]
        self.batch_sampler.resume(batches_done if batches_done < len(self.batch_sampler) else 0)
