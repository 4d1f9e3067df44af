"""Subword regularization (data.subword_sampling): each training batch segmented anew, reproducibly, from
the training text held in memory or read from the files by line."""

from __future__ import annotations

import torch
from hydra.utils import instantiate

from seq2seq.data.corpora import read_lines
from seq2seq.data.sampling import FileLines, ResampledSplit
from seq2seq.tokenization import EOS_ID, PAD_ID
from seq2seq.training import train
from tests.test_training import QUIET

UNIGRAM = ["data.subword.model_type=unigram", "data.subword.vocab_size=40", "data.corpus.sizes.train=300"]
SAMPLING = ["+data.subword_sampling.alpha=0.1"]


def segmentations(datamodule, epoch: int) -> list[list[list[int]]]:
    """The source ids of each pair of the epoch's first 5 batches."""
    sampler = datamodule.train_dataloader().batch_sampler
    batches = sampler.batches(epoch)[:5]
    out = []
    for indices in batches:
        batch = datamodule.resampled.collate((epoch, indices))
        out.append([row[:length].tolist() for row, length in zip(batch.src, batch.src_lengths, strict=True)])
    return out


def test_each_epoch_segments_the_training_text_anew_and_reproducibly(compose_config):
    datamodule = instantiate(compose_config("experiment=smoke", *UNIGRAM, *SAMPLING).data)
    datamodule.setup("fit")
    assert isinstance(datamodule.resampled, ResampledSplit)
    first, again, second = (
        segmentations(datamodule, 0),
        segmentations(datamodule, 0),
        segmentations(datamodule, 1),
    )
    assert first == again  # seeded by (seed, epoch, pairs): the same wherever it is built
    cached = datamodule.splits["train"]
    indices = datamodule.train_dataloader().batch_sampler.batches(0)[:5]
    best = [[cached.src_ids[i] for i in batch] for batch in indices]
    assert first != best  # sampled, not the cache's best segmentation
    texts = datamodule.texts["train"]
    tokenizer = datamodule.tokenizer
    for batch, ids in zip(indices, first, strict=True):  # the same text, segmented differently
        assert tokenizer.src.decode(ids) == [texts.src[i] for i in batch]
    batch = datamodule.resampled.collate((1, indices[0]))
    assert batch.num_target_tokens == int((batch.tgt_out != PAD_ID).sum())
    assert (batch.tgt_out.gather(1, batch.tgt_in.ne(PAD_ID).sum(1, keepdim=True) - 1) == EOS_ID).all()
    assert second != first


def test_file_lines_are_read_by_number_as_the_corpus_reader_reads_them(tmp_path):
    path = tmp_path / "train.de"
    path.write_bytes("\ufeffeins\r\nzwei\n\ndrei ü\nvier".encode())
    lines = FileLines(path, chunk=3)  # lines across read chunks
    assert [lines[i] for i in range(len(lines.starts))] == read_lines(path)


def test_a_file_corpus_resamples_the_kept_lines(compose_config, tmp_path):
    """An empty line is dropped when the cache is prepared: the kept pairs map back to their lines."""
    words = [f"w{i} w{(i * 7) % 13} w{(i * 3) % 11}" for i in range(60)]
    files = {}
    for split in ("train", "valid"):
        for side, lines in (("src", words), ("tgt", words[::-1])):
            if split == "train":  # a pair with an empty source, dropped
                lines = [*lines[:5], "" if side == "src" else "w1", *lines[5:]]
            files[f"{split}_{side}"] = tmp_path / f"{split}.{side}"
            files[f"{split}_{side}"].write_text("\n".join(lines) + "\n")
    cfg = compose_config(
        "data=files",
        *[f"data.corpus.{k}={v}" for k, v in files.items()],
        "data.subword.model_type=unigram",
        "data.subword.vocab_size=30",
        "data.max_len=16",
        "data.batch_tokens=200",
        *SAMPLING,
    )
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    assert len(datamodule.splits["train"]) == 60
    tokenizer = datamodule.tokenizer
    batch = datamodule.resampled.collate((0, list(range(60))))
    sources = [row[:n].tolist() for row, n in zip(batch.src, batch.src_lengths, strict=True)]
    targets = [row[row != PAD_ID][:-1].tolist() for row in batch.tgt_out]
    assert tokenizer.src.decode(sources) == words
    assert tokenizer.tgt.decode(targets) == words[::-1]


def test_training_with_subword_sampling_runs_end_to_end(compose_config, tmp_path):
    cfg = compose_config(
        "experiment=smoke",
        *UNIGRAM,
        *SAMPLING,
        "trainer.max_steps=12",
        "trainer.val_check_interval=12",
        "decoding.beam=1",
        "data.num_workers=1",
        *QUIET,
    )
    assert train(cfg) >= 0
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 12
