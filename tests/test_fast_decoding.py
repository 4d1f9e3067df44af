"""Faster decoding (issue 45): the search without prefix copies gives today's outputs exactly; lexical
shortlists (built from the training data beside the checkpoint, per sentence); int8 decoding."""

import logging
import random
import warnings

import numpy as np
import pytest
import torch

from seq2seq.data.collate import pad
from seq2seq.decoding import DecodingSettings
from seq2seq.model import Ensemble
from seq2seq.search import beam_candidates, beam_search, greedy_search
from seq2seq.shortlist import LexicalTable, build_table, load_or_build, table_path
from seq2seq.tokenization import BOS_ID, EOS_ID, PAD_ID
from seq2seq.translator import Translator, quantize_int8

from . import legacy_search
from .conftest import tiny_model
from .test_training import QUIET, run_script

MODELS = [
    {},
    {"bidirectional": True, "bridge": True},
    {"attention": "bahdanau", "bidirectional": True, "bridge": True},
    {"attention": "luong_general", "input_feeding": False},
]


def random_case(seed: int) -> tuple:
    """A tiny model (every fifth an ensemble of two), a batch of sources and search settings."""
    rng = random.Random(seed)
    model = tiny_model(seed=seed, **MODELS[seed % len(MODELS)])
    if seed % 5 == 0:
        model = Ensemble([model, tiny_model(seed=seed + 100, attention="bahdanau")])
    sources = [[rng.randint(4, 11) for _ in range(rng.randint(1, 7))] for _ in range(rng.randint(1, 6))]
    beam = rng.randint(1, 6)
    settings = {
        "beam_size": beam,
        "alpha": rng.choice([0.0, 0.6, 1.0, 2.5]),
        "max_len_a": rng.choice([0.0, 1.0, 1.5]),
        "max_len_b": rng.randint(1, 6),
        "min_len": rng.choice([0, 0, 2, 5]),
        "nbest": rng.randint(1, beam),
    }
    return model, pad(sources), torch.tensor([len(s) for s in sources]), settings


def as_tuples(results: list) -> list:
    return [[(h.tokens, h.log_prob, h.score) for h in hyps] for hyps in results]


@pytest.mark.parametrize("seed", range(40))
def test_the_search_gives_exactly_the_outputs_of_the_search_before_it(seed):
    """Beam search (n-best lists, scores), greedy search and the candidates of alpha=auto: the same
    tokens and the same floats as the search that re-concatenated prefixes at every step."""
    model, src, lengths, s = random_case(seed)
    assert as_tuples(beam_search(model, src, lengths, **s)) == as_tuples(
        legacy_search.beam_search(model, src, lengths, **s)
    )
    limits = [s["max_len_a"], s["max_len_b"], s["min_len"]]
    assert as_tuples([[h] for h in greedy_search(model, src, lengths, *limits)]) == as_tuples(
        [[h] for h in legacy_search.greedy_search(model, src, lengths, *limits)]
    )
    settings = DecodingSettings(
        beam=s["beam_size"], max_len_a=s["max_len_a"], max_len_b=s["max_len_b"],
        min_len=min(s["min_len"], s["max_len_b"]),
    )  # fmt: skip
    assert as_tuples(beam_candidates(model, src, lengths, settings)) == as_tuples(
        legacy_search.beam_candidates(model, src, lengths, settings)
    )


def lexicon_table(vocab: int = 12, seed: int = 0) -> LexicalTable:
    """A random lexical table over a 12-piece vocabulary (4 specials)."""
    rng = np.random.default_rng(seed)
    translations = np.stack([rng.permutation(np.arange(4, vocab)) for _ in range(vocab)])
    return LexicalTable(translations, rng.permutation(np.arange(vocab)))


@pytest.mark.parametrize("options", MODELS[:3])
def test_a_shortlist_of_every_piece_finds_the_same_outputs(options):
    model = tiny_model(seed=3, **options)
    with torch.no_grad():  # PAD and BOS, which a shortlist leaves out, get no probability (as once trained)
        model.decoder.output.bias[[PAD_ID, BOS_ID]] = -1e4
    sources = [[4, 5, 6], [7, 8], [9, 10, 11, 4, 5]]
    shortlist = lexicon_table().shortlist(sources, k=1, frequent=12)
    src, lengths = pad(sources), torch.tensor([len(s) for s in sources])
    plain = beam_search(model, src, lengths, beam_size=3, nbest=2, max_len_a=1.0, max_len_b=4)
    listed = beam_search(
        model, src, lengths, beam_size=3, nbest=2, max_len_a=1.0, max_len_b=4, shortlist=shortlist
    )
    assert [[h.tokens for h in hyps] for hyps in listed] == [[h.tokens for h in hyps] for hyps in plain]
    for a, b in zip(plain, listed, strict=True):
        assert [h.log_prob for h in a] == pytest.approx([h.log_prob for h in b], abs=1e-5)


@pytest.mark.parametrize("beam", [1, 3])
def test_a_shortlisted_sentence_writes_only_its_own_pieces_alone_or_in_any_batch(beam):
    model = Ensemble([tiny_model(seed=4), tiny_model(seed=5, attention="bahdanau")])
    table = lexicon_table(seed=1)
    sources = [[4, 5, 6], [7, 8], [9, 10, 11, 4, 5], [6], [8, 8, 9, 10]]
    limits = {"max_len_a": 1.0, "max_len_b": 4, "beam_size": beam, "alpha": 0.0}

    def search(batch):
        src, lengths = pad(batch), torch.tensor([len(s) for s in batch])
        return beam_search(model, src, lengths, **limits, shortlist=table.shortlist(batch, k=2, frequent=1))

    together = search(sources)
    for sentence, hyps in zip(sources, together, strict=True):
        own = set(table.translations[sentence, :2].ravel().tolist()) | {int(table.frequent[0])}
        assert set(hyps[0].tokens) <= own - {0, 1, 2, EOS_ID}
        alone = search([sentence])
        assert alone[0][0].tokens == hyps[0].tokens
        assert alone[0][0].log_prob == pytest.approx(hyps[0].log_prob, abs=1e-5)
    assert any(hyps[0].tokens for hyps in together)  # the test is not passed by empty outputs


def test_ibm_model_1_finds_the_translations_of_a_word_for_word_lexicon():
    """Source piece s translates to target piece lexicon[s] in random sentences, in shuffled order and
    among frequent pieces: each source piece's best target piece is its translation."""
    rng = np.random.default_rng(0)
    lexicon = {s: t for s, t in zip(range(4, 40), rng.permutation(np.arange(4, 40)), strict=True)}
    pairs = []
    for _ in range(3000):
        src = rng.choice(np.arange(4, 40), size=rng.integers(2, 9))
        tgt = rng.permutation([lexicon[s] for s in src] + [40, 41])  # 40, 41: in every target sentence
        pairs.append((src, tgt))
    table = build_table(pairs, src_vocab=42, tgt_vocab=42)
    assert {s: int(table.translations[s, 0]) for s in lexicon} == lexicon
    assert set(table.frequent[:2].tolist()) == {40, 41}
    assert table.translations[0].tolist() == [-1] * table.translations.shape[1]  # never seen


def test_int8_decoding_quantizes_the_lstms_and_the_output_layer_and_stays_close():
    model = tiny_model(seed=6, bidirectional=True, bridge=True, embed_size=32, hidden_size=64)
    with torch.no_grad():  # PAD and BOS, which a shortlist leaves out, get no probability (as once trained)
        model.decoder.output.bias[[PAD_ID, BOS_ID]] = -1e4
    quantized = quantize_int8(model)
    kinds = {
        type(m).__module__ for m in (quantized.encoder.rnn, quantized.decoder.rnn, quantized.decoder.output)
    }
    assert kinds == {
        "torch.ao.nn.quantized.dynamic.modules.rnn",
        "torch.ao.nn.quantized.dynamic.modules.linear",
    }
    assert type(model.decoder.rnn) is torch.nn.LSTM  # the original is left as it was
    src, lengths = pad([[4, 5, 6, 7], [8, 9]]), torch.tensor([4, 2])
    tokens = torch.tensor([4, 5])
    with torch.no_grad():
        exact, _ = model.decode_step(tokens, model.encode(src, lengths))
        approximate, _ = quantized.decode_step(tokens, quantized.encode(src, lengths))
    assert (approximate - exact).abs().max() < 0.05
    assert not torch.equal(approximate, exact)
    # its shortlisted projection packs the int8 rows of the shortlist: the same outputs for a full one
    sources = [[4, 5, 6, 7], [8, 9], [10, 11, 4]]
    src, lengths = pad(sources), torch.tensor([len(s) for s in sources])
    shortlist = lexicon_table().shortlist(sources, k=1, frequent=12)
    plain = beam_search(quantized, src, lengths, beam_size=3, max_len_a=1.0, max_len_b=5)
    listed = beam_search(
        quantized, src, lengths, beam_size=3, max_len_a=1.0, max_len_b=5, shortlist=shortlist
    )
    assert [hyps[0].tokens for hyps in listed] == [hyps[0].tokens for hyps in plain]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"shortlist": "yes"}, "shortlist must be true or false, got 'yes'"),
        ({"shortlist_k": 0}, "shortlist_k must be an integer between 1 and 100, got 0"),
        ({"shortlist_k": 101}, "shortlist_k must be an integer between 1 and 100, got 101"),
        ({"shortlist_frequent": -1}, "shortlist_frequent must be an integer >= 0, got -1"),
        ({"quantize": "int4"}, "quantize must be one of auto, int8, none, got 'int4'"),
    ],
)
def test_the_fast_decoding_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        DecodingSettings(**options)


@pytest.fixture(scope="module")
def smoke_checkpoint(tmp_path_factory):
    """The best checkpoint of ``python train.py experiment=smoke`` (a word-level reverse task)."""
    root = tmp_path_factory.mktemp("fast_decoding")
    result = run_script(
        "train.py", "experiment=smoke", f"hydra.run.dir={root / 'run'}", f"paths.cache_dir={root / 'cache'}",
        "evaluate.test=false", *QUIET,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (best,) = (root / "run" / "checkpoints").glob("best-*.ckpt")
    return best


@pytest.mark.slow
@pytest.mark.xdist_group("fast_decoding:smoke_checkpoint")
def test_translate_py_builds_the_shortlist_on_first_use_and_keeps_it_beside_the_checkpoint(
    smoke_checkpoint, tmp_path
):
    source = tmp_path / "test.src"
    source.write_text("w1 w2 w3\nw4 w5 w6 w7\n\nw8\n")
    translator = Translator.from_checkpoint(smoke_checkpoint)
    kept = table_path(smoke_checkpoint, translator.tokenizer)
    kept.unlink(missing_ok=True)
    outputs = []
    for run in range(2):
        output = tmp_path / f"out{run}.txt"
        result = run_script("translate.py", f"ckpt={smoke_checkpoint}", f"input={source}", f"output={output}")
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("shortlist: built from the training data" in result.stderr) == (run == 0)
        outputs.append(output.read_text())
    assert kept.is_file()
    assert outputs[0] == outputs[1]
    # The reverse task maps each word to itself: each one's best target piece is that word.
    table = translator.lexical_table()
    tokenizer = translator.tokenizer
    for word in ("▁w1", "▁w7", "▁w15"):
        assert tokenizer.tgt.id_to_piece(int(table.translations[tokenizer.src.piece_to_id(word), 0])) == word


@pytest.mark.slow
@pytest.mark.xdist_group("fast_decoding:smoke_checkpoint")
def test_without_its_training_data_a_checkpoint_decodes_the_whole_vocabulary_with_a_warning(
    smoke_checkpoint, tmp_path, caplog
):
    moved = tmp_path / smoke_checkpoint.name
    moved.write_bytes(smoke_checkpoint.read_bytes())
    translator = Translator.from_checkpoint(moved)
    missing = {
        "_target_": "seq2seq.data.corpora.load_files",
        "_partial_": True,
        "train_src": str(tmp_path / "gone.de"),
    }
    with caplog.at_level(logging.WARNING):
        table = load_or_build(moved, translator.tokenizer, {"data": {"corpus": missing}})
    assert table is None
    assert "shortlist: the training data of" in caplog.text and "whole vocabulary" in caplog.text
    assert not table_path(moved, translator.tokenizer).exists()
    without = Translator(translator.model, translator.tokenizer, 16, lexical_table=table)
    sentences = ["w1 w2 w3", "w9 w8 w7 w6"]
    assert without.translate(sentences) == translator.translate(sentences, shortlist=False)
    assert translator.int8(DecodingSettings()) and not Translator(
        translator.model, None, 16, "cpu", precision="bf16"
    ).int8(DecodingSettings())


@pytest.mark.slow
@pytest.mark.xdist_group("fast_decoding:smoke_checkpoint")
def test_a_trained_model_translates_in_int8_without_warnings_and_mostly_as_in_fp32(smoke_checkpoint):
    translator = Translator.from_checkpoint(smoke_checkpoint)
    sentences = [" ".join(f"w{(i * 7 + j) % 20}" for j in range(3 + i % 5)) for i in range(20)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation notice of eager quantization reaches users
        int8 = translator.translate(sentences, quantize="int8")
    fp32 = translator.translate(sentences, quantize="none")
    assert sum(a == b for a, b in zip(int8, fp32, strict=True)) >= 15
