"""Several corpora in one run (data=corpora): the epoch's mixture, the tags, per-corpus scores, bad input."""

from __future__ import annotations

import csv
import functools
import json
import logging

import numpy as np
import pytest
from hydra.utils import instantiate

from seq2seq.data.corpora import load_synthetic
from seq2seq.data.datamodule import TranslationDataModule
from seq2seq.data.mixture import load_corpora
from seq2seq.data.sampler import CorpusMixture, TokenBucketBatchSampler
from seq2seq.decoding import DecodingSettings
from seq2seq.evaluation import choose_alpha
from seq2seq.metrics import mean_over_corpora, scores_by_corpus
from seq2seq.tokenization import SubwordSettings, train_tokenizer
from seq2seq.training import train
from seq2seq.translator import Translator
from tests.test_training import QUIET


def synthetic(task: str, train_pairs: int, seed: int):
    sizes = {"train": train_pairs, "valid": 20, "test": 20}
    return functools.partial(load_synthetic, task, 20, 3, 8, sizes, seed)


@pytest.fixture
def mixture_data(compose_config) -> TranslationDataModule:
    """data=toy_mixture: copy (3,000 pairs, weight 1, tag <2copy>) and reverse (1,000, weight 3, <2rev>)."""
    datamodule = instantiate(compose_config("data=toy_mixture").data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def test_each_epoch_holds_the_corpora_in_proportion_to_their_weights(mixture_data):
    sampler = mixture_data._batch_sampler(mixture_data.splits["train"], "train")
    corpus_ids = mixture_data.corpus_ids["train"]
    assert np.bincount(corpus_ids).tolist() == [3000, 1000]
    for epoch in range(3):
        served = np.concatenate([sampler.plan(epoch).batch(b) for b in sampler.rank_batch_numbers(epoch)])
        shares = np.bincount(corpus_ids[served], minlength=2) / len(served)
        assert abs(shares[0] - 0.25) < 0.02 and abs(shares[1] - 0.75) < 0.02, (epoch, shares)
        assert len(served) == pytest.approx(4000, rel=0.02)
    # The reverse corpus is oversampled 3x: every pair 3 times, none more (the draw, before batching).
    drawn = np.bincount(mixture_data.mixture.draw(1), minlength=4000)
    assert set(drawn[3000:].tolist()) == {3} and set(drawn[:3000].tolist()) == {0, 1}


def test_oversampled_copies_of_a_pair_go_to_different_batches_spread_over_the_epoch(mixture_data):
    """The reverse corpus's pairs come 3 times an epoch. The copies of a pair have one length, so sorted by
    length they went into one batch (3 times its weight in one step); each goes to another batch now,
    the epoch still serves the whole draw, and every epoch and rank has the same number of batches."""
    split = mixture_data.splits["train"]
    lengths = split.src_lengths(), split.tgt_lengths()
    draw = mixture_data.mixture.draw
    ranks = [
        TokenBucketBatchSampler(*lengths, 640, shuffle=True, seed=1, num_replicas=2, rank=r, epoch_pairs=draw)
        for r in (0, 1)
    ]
    for epoch in range(3):
        batches = ranks[0].batches(epoch)
        assert [b for b in batches if len(set(b)) < len(b)] == [], epoch
        assert sorted(i for b in batches for i in b) == sorted(draw(epoch).tolist())
        # The 3 copies of a pair are served in 3 batches, which lie far apart in the epoch's order.
        where = {}
        for position, batch in enumerate(batches):
            for i in batch:
                where.setdefault(i, []).append(position)
        gaps = [max(p) - min(p) for i, p in where.items() if len(p) == 3]
        assert len(gaps) == 1000 and np.median(gaps) > len(batches) / 3
        assert len(ranks[0].rank_batches(epoch)) == len(ranks[1].rank_batches(epoch)) == len(ranks[0])


def test_a_draw_oversamples_whole_passes_then_samples_the_rest():
    mixture = CorpusMixture(np.array([0] * 10 + [1] * 4), weights=[1.0, 4.0], seed=0)
    assert mixture.counts.tolist() == [3, 11]  # 14 pairs an epoch: 1/5 and 4/5 of them
    drawn = np.bincount(mixture.draw(0), minlength=14)
    assert drawn[:10].sum() == 3 and drawn[:10].max() == 1
    assert sorted(drawn[10:].tolist()) == [2, 3, 3, 3]  # 11 = 2 whole passes over 4 pairs + 3 more
    assert not np.array_equal(mixture.draw(0), mixture.draw(1)) and np.array_equal(
        mixture.draw(2), mixture.draw(2)
    )


def test_the_tag_is_the_first_source_id_and_is_kept_whole_at_translation(mixture_data):
    tokenizer, ids = mixture_data.tokenizer, mixture_data.splits["train"].src_ids
    tags = tokenizer.src_tags
    assert set(tags) == {"<2copy>", "<2rev>"}
    first = np.array([ids[i][0] for i in range(len(ids))])
    corpus_ids = mixture_data.corpus_ids["train"]
    assert (first[corpus_ids == 0] == tags["<2copy>"]).all() and (
        first[corpus_ids == 1] == tags["<2rev>"]
    ).all()
    assert not set(tags.values()) & {piece for i in range(50) for piece in ids[i][1:]}  # only there
    # The translator encodes a tagged line as training saw it.
    assert tokenizer.encode_src(["<2rev> w1 w2"]) == [[tags["<2rev>"], *tokenizer.encode_src(["w1 w2"])[0]]]
    assert mixture_data.texts["valid"].src[0].startswith("<2copy> ")


@pytest.mark.slow
def test_validation_test_and_the_length_penalty_are_scored_per_corpus(compose_config, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cfg = compose_config("experiment=smoke", "data=toy_mixture", "decoding.beam=2", *QUIET)
    best = train(cfg)
    run = tmp_path / "run"
    rows = [row for row in csv.DictReader((run / "logs" / "metrics.csv").open()) if row.get("val_bleu")]
    assert len(rows) == 2
    for row in rows:
        per_corpus = float(row["val_bleu/copy"]), float(row["val_bleu/reverse"])
        assert float(row["val_bleu"]) == pytest.approx(sum(per_corpus) / 2, abs=1e-3)
    assert best == pytest.approx(max(float(row["val_bleu"]) for row in rows), abs=1e-3)
    log = caplog.text
    assert "BLEU by corpus copy " in log and "Corpus reverse: 1000 training pairs, weight 3" in log

    result = json.loads((run / "result.json").read_text())
    assert set(result["test_bleu_by_corpus"]) == {"copy", "reverse"}
    assert result["test_bleu"] == pytest.approx(sum(result["test_bleu_by_corpus"].values()) / 2)

    # alpha=auto chose the length penalty by the mean of the corpora's validation BLEU, as val_bleu is
    # (not by BLEU over the pooled sentences, which weighs the larger corpus more).
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    valid, ids = datamodule.texts["valid"], datamodule.corpus_ids["valid"].tolist()
    corpora = [("copy", None), ("reverse", None)]
    translator = Translator.from_checkpoint(result["checkpoint"])
    choice = choose_alpha(translator, valid.src, valid.tgt, DecodingSettings(beam=2), [0.6, 1.0, 1.5, 2.0])
    pooled = {str(alpha): bleu for alpha, bleu in choice.bleu.items()}
    per_corpus = {
        str(alpha): mean_over_corpora(scores_by_corpus(outputs, valid.tgt, ids, corpora))[0]
        for alpha, outputs in choice.translations.items()
    }
    assert result["alpha_bleu"] == pytest.approx(per_corpus) and pooled != pytest.approx(per_corpus)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"weight": 0}, r"data.corpus.corpora.a.weight must be a number > 0, got 0"),
        ({"weight": -1.5}, r"data.corpus.corpora.a.weight must be a number > 0"),
        ({"tag": "2en"}, r"data.corpus.corpora.a.tag='2en' must be one token in angle brackets"),
        ({"tag": "<2 en>"}, r"data.corpus.corpora.a.tag='<2 en>' must be one token"),
        ({"tag": "</s>"}, r"data.corpus.corpora.a.tag='</s>' must be .* not one of"),
        ({"wieght": 1}, r"data.corpus.corpora.a: needs reader and may set weight, tag, tgt_lang"),
    ],
)
def test_bad_corpus_options_are_one_line_errors_naming_the_option(entry, message):
    corpora = {
        "a": {"reader": synthetic("copy", 50, 1), **entry},
        "b": {"reader": synthetic("reverse", 50, 2)},
    }
    with pytest.raises(ValueError, match=message) as error:
        load_corpora(corpora)
    assert "\n" not in str(error.value)


def test_a_tag_outside_a_given_vocabulary_is_an_error_naming_the_option():
    lines = [f"w{i} w{i + 1}" for i in range(20)]
    tokenizer = train_tokenizer(lines, lines, SubwordSettings(vocab_size=30, model_type="word"))
    with pytest.raises(ValueError, match=r"^data.corpus.corpora.\*.tag .*\['<2en>'\] not in the vocabulary"):
        tokenizer.check_tags(["<2en>"], "data.corpus.corpora.*.tag (init_from's vocabulary)")
