import itertools

import pytest
import torch

from seq2seq.data.batching import pad
from seq2seq.model import Ensemble
from seq2seq.search import beam_search, greedy_search, length_penalty
from seq2seq.tokenization import BOS_ID, EOS_ID

from .conftest import tiny_model

SOURCES = [[4, 5, 6], [7, 8], [9, 10, 11, 4, 5], [6], [8, 8, 9, 10]]


def batch(sources=SOURCES):
    return pad(sources), torch.tensor([len(s) for s in sources])


@torch.no_grad()
def sequence_log_prob(model, src, lengths, tokens):
    """Model log-probability of tokens + EOS for a single source sentence."""
    state = model.encode(src, lengths)
    total, previous = 0.0, BOS_ID
    for token in [*tokens, EOS_ID]:
        log_probs, state = model.decode_step(torch.tensor([previous]), state)
        total += float(log_probs[0, token])
        previous = token
    return total


# The search runs on any model with the single-step API: context vector, attention, an ensemble.
MODELS = [
    {"bidirectional": True, "bridge": True},
    {"attention": "bahdanau", "bidirectional": True, "bridge": True},
    {"attention": "luong_general", "input_feeding": False},
]


@pytest.mark.parametrize(("seed", "options"), [(0, MODELS[0]), (1, MODELS[1]), (2, MODELS[2])])
def test_beam_size_one_is_greedy(seed, options):
    model = tiny_model(seed=seed, **options)
    src, lengths = batch()
    greedy = greedy_search(model, src, lengths, max_len_a=1.0, max_len_b=3)
    beam = beam_search(model, src, lengths, beam_size=1, alpha=0.6, max_len_a=1.0, max_len_b=3)
    assert [h.tokens for h in greedy] == [hyps[0].tokens for hyps in beam]
    for g, (b,) in zip(greedy, beam, strict=True):
        assert g.log_prob == pytest.approx(b.log_prob, abs=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_wide_beam_finds_the_exhaustive_best(seed):
    """A beam as wide as the vocabulary, outputs of at most 2 tokens: the same best as trying them all."""
    model = tiny_model(seed=seed)
    vocab = model.decoder.output.out_features
    src, lengths = batch([[4, 5, 6]])
    symbols = [t for t in range(vocab) if t != EOS_ID]
    candidates = [list(c) for n in range(3) for c in itertools.product(symbols, repeat=n)]
    best_log_prob, best = max((sequence_log_prob(model, src, lengths, c), c) for c in candidates)
    (found,) = beam_search(model, src, lengths, beam_size=vocab, alpha=0.0, max_len_a=0.0, max_len_b=2)
    assert found[0].tokens == best
    assert found[0].log_prob == pytest.approx(best_log_prob, abs=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_beam_five_never_scores_below_greedy(seed):
    model = tiny_model(seed=seed, reverse_source=True)
    src, lengths = batch()
    greedy = greedy_search(model, src, lengths, max_len_a=1.0, max_len_b=4)
    beam = beam_search(model, src, lengths, beam_size=5, alpha=0.0, max_len_a=1.0, max_len_b=4)
    for g, hyps in zip(greedy, beam, strict=True):
        assert hyps[0].log_prob >= g.log_prob - 1e-5


@pytest.mark.parametrize("options", MODELS)
def test_batched_beam_equals_one_sentence_at_a_time(options):
    model = tiny_model(seed=1, **options)
    src, lengths = batch()
    batched = beam_search(model, src, lengths, beam_size=4, nbest=2, max_len_a=1.0, max_len_b=4)
    for i, sentence in enumerate(SOURCES):
        alone = beam_search(model, *batch([sentence]), beam_size=4, nbest=2, max_len_a=1.0, max_len_b=4)
        assert [h.tokens for h in alone[0]] == [h.tokens for h in batched[i]]


def test_nbest_is_sorted_and_scores_are_length_normalized_log_probs():
    model = tiny_model(seed=2)
    src, lengths = batch()
    results = beam_search(model, src, lengths, beam_size=5, nbest=3, alpha=0.6, max_len_a=1.0, max_len_b=4)
    for i, hyps in enumerate(results):
        assert len(hyps) == 3
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        for h in hyps:
            exact = sequence_log_prob(model, src[i : i + 1, : lengths[i]], lengths[i : i + 1], h.tokens)
            assert h.log_prob == pytest.approx(exact, abs=1e-4)
            assert h.score == pytest.approx(h.log_prob / length_penalty(len(h.tokens) + 1, 0.6), abs=1e-4)


def test_output_length_limits_and_min_length():
    model = tiny_model(seed=3)
    src, lengths = batch()
    for h in greedy_search(model, src, lengths, max_len_a=0.0, max_len_b=2):
        assert len(h.tokens) <= 2
    for (h,) in beam_search(model, src, lengths, beam_size=3, max_len_a=0.0, max_len_b=6, min_len=4):
        assert 4 <= len(h.tokens) <= 6


def test_bad_search_settings_fail_clearly():
    model = tiny_model()
    src, lengths = batch()
    with pytest.raises(ValueError, match="beam size must be at least 1"):
        beam_search(model, src, lengths, beam_size=0)
    with pytest.raises(ValueError, match="nbest"):
        beam_search(model, src, lengths, beam_size=2, nbest=3)


def test_an_ensemble_of_a_model_with_itself_searches_as_the_model():
    model = tiny_model(seed=2, attention="bahdanau")
    src, lengths = batch()
    ensemble = Ensemble([model, model])
    for beam in (1, 4):
        single = beam_search(model, src, lengths, beam_size=beam, max_len_a=1.0, max_len_b=4)
        both = beam_search(ensemble, src, lengths, beam_size=beam, max_len_a=1.0, max_len_b=4)
        assert [[h.tokens for h in hyps] for hyps in both] == [[h.tokens for h in hyps] for hyps in single]


def test_an_ensemble_averages_log_probabilities():
    first, second = tiny_model(seed=3), tiny_model(seed=4)
    src, lengths = batch()
    bos = torch.full((len(SOURCES),), BOS_ID)
    expected = sum(model.decode_step(bos, model.encode(src, lengths))[0] for model in (first, second)) / 2
    ensemble = Ensemble([first, second])
    torch.testing.assert_close(ensemble.decode_step(bos, ensemble.encode(src, lengths))[0], expected)
