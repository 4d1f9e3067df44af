import contextlib
import itertools
import signal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seq2seq.data.collate import pad
from seq2seq.decoding import DecodingSettings
from seq2seq.model import Ensemble
from seq2seq.search import (
    beam_candidates,
    beam_search,
    best_for_alpha,
    greedy_search,
    length_penalty,
    output_limits,
)
from seq2seq.shortlist import Shortlist
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
    for h in greedy_search(model, src, lengths, max_len_a=0.0, max_len_b=6, min_len=4):
        assert 4 <= len(h.tokens) <= 6


def test_bad_search_settings_fail_clearly():
    model = tiny_model()
    src, lengths = batch()
    with pytest.raises(ValueError, match="beam size must be at least 1"):
        beam_search(model, src, lengths, beam_size=0)
    with pytest.raises(ValueError, match="nbest"):
        beam_search(model, src, lengths, beam_size=2, nbest=3)
    with pytest.raises(ValueError, match="alpha must be at least 0"):
        beam_search(model, src, lengths, beam_size=2, alpha=-0.5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"beam": 0}, "beam must be an integer of at least 1, got 0"),
        ({"beam": 2.5}, "beam must be an integer of at least 1, got 2.5"),
        ({"beam": 2, "nbest": 3}, "nbest must be between 1 and beam=2, got 3"),
        ({"alpha": -1.0}, "alpha must be a number >= 0 or 'auto', got -1.0"),
        ({"alpha": "fast"}, "alpha must be a number >= 0 or 'auto', got 'fast'"),
        ({"alpha": float("nan")}, "alpha must be a number >= 0"),
        ({"max_len_a": -1}, "max_len_a must be a number >= 0, got -1"),
        ({"max_len_b": 0}, "max_len_b must be an integer of at least 1, got 0"),
        ({"min_len": -1}, "min_len must be an integer between 0 and max_len_b=10"),
        ({"min_len": 11}, "min_len must be an integer between 0 and max_len_b=10"),
        ({"batch_tokens": 0}, "batch_tokens must be a positive integer, got 0"),
    ],
)
def test_decoding_settings_are_checked_in_one_place(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        DecodingSettings(**options)
    with pytest.raises(ValueError, match=f"decoding.{message.split()[0]}"):
        DecodingSettings.from_config(options, prefix="decoding.")


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail, instead of hanging, if the block takes longer than ``seconds``."""

    def expire(signum, frame):
        raise TimeoutError(f"the search did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("beam", [1, 3])
@pytest.mark.parametrize("extra", [-1, 0, 1, 5])
def test_min_len_near_or_beyond_the_length_limit_ends_at_the_limit(beam, extra):
    """min_len = limit + extra: EOS is blocked until min_len, but never at the limit (it used to hang)."""
    model = tiny_model(seed=4)
    src, lengths = batch()
    limit = 3
    with deadline(20):
        results = beam_search(
            model, src, lengths, beam_size=beam, max_len_a=0.0, max_len_b=limit, min_len=limit + extra
        )
        greedy = greedy_search(model, src, lengths, max_len_a=0.0, max_len_b=limit, min_len=limit + extra)
    for (h,), g in zip(results, greedy, strict=True):
        assert min(limit + extra, limit) <= len(h.tokens) <= limit
        assert min(limit + extra, limit) <= len(g.tokens) <= limit


@pytest.mark.parametrize("shortlisted", [False, True])
def test_a_search_asked_for_more_outputs_than_exist_returns_each_of_them_once(shortlisted):
    """nbest above the number of outputs that the length limit (and the shortlist) allow: all of them,
    best first. The search used to wait for more forever (a request could hang the server)."""
    model = tiny_model(seed=1)
    src, lengths = batch()
    if shortlisted:  # each sentence may write EOS and word 5 only
        shortlist = Shortlist(torch.tensor([EOS_ID, 5]), torch.ones(len(SOURCES), 2, dtype=torch.bool))
        beam, outputs = 3, [[], [5]]
    else:  # at most one of the 11 symbols other than EOS
        shortlist, beam, outputs = None, 16, [[], *([t] for t in range(12) if t != EOS_ID)]
    with deadline(20):
        results = beam_search(
            model, src, lengths, beam_size=beam, nbest=beam, max_len_a=0.0, max_len_b=1, shortlist=shortlist
        )
    for hyps in results:
        assert sorted(h.tokens for h in hyps) == sorted(outputs)
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)


small_sources = st.lists(st.lists(st.integers(4, 11), min_size=1, max_size=6), min_size=1, max_size=4)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 1000),
    options=st.sampled_from([{}, *MODELS]),
    sources=small_sources,
    beam=st.integers(1, 4),
    alpha=st.floats(0.0, 3.0),
    max_len_a=st.sampled_from([0.0, 0.5, 1.5]),
    max_len_b=st.integers(1, 4),
    min_len=st.integers(0, 8),
)
def test_beam_search_always_returns_one_hypothesis_per_input_within_the_limits(
    seed, options, sources, beam, alpha, max_len_a, max_len_b, min_len
):
    model = tiny_model(seed=seed, **options)
    src, lengths = batch(sources)
    limits = output_limits(lengths, max_len_a, max_len_b).tolist()
    settings = {"max_len_a": max_len_a, "max_len_b": max_len_b, "min_len": min_len}
    with deadline(30):
        results = beam_search(model, src, lengths, beam_size=beam, alpha=alpha, **settings)
        greedy = greedy_search(model, src, lengths, **settings)
    assert len(results) == len(sources)
    for (h,), limit in zip(results, limits, strict=True):
        assert min(min_len, limit) <= len(h.tokens) <= limit
        assert EOS_ID not in h.tokens
    if beam == 1:
        assert [hyps[0].tokens for hyps in results] == [g.tokens for g in greedy]


# All outputs of at most 2 tokens over the 11 symbols other than EOS: 1 + 11 + 11 ** 2.
EVERY_SHORT_OUTPUT = 133


@pytest.mark.parametrize(("alpha", "min_len"), [(0.5, 0), (2.0, 0), (1.5, 1)])
def test_beam_search_with_a_length_penalty_finds_the_exhaustive_best(alpha, min_len):
    """A beam that holds every possible output finds the best length-normalized score there is."""
    model = tiny_model(seed=5)
    src, lengths = batch([[4, 5, 6]])
    symbols = [t for t in range(12) if t != EOS_ID]
    candidates = [list(c) for n in range(min_len, 3) for c in itertools.product(symbols, repeat=n)]
    scored = [
        (sequence_log_prob(model, src, lengths, c) / length_penalty(len(c) + 1, alpha), c) for c in candidates
    ]
    best_score, best = max(scored)
    (found,) = beam_search(
        model, src, lengths, beam_size=EVERY_SHORT_OUTPUT, alpha=alpha, max_len_a=0.0, max_len_b=2,
        min_len=min_len,
    )  # fmt: skip
    assert found[0].tokens == best
    assert found[0].score == pytest.approx(best_score, abs=1e-5)


@pytest.mark.parametrize("seed", range(2))
def test_one_search_rescored_gives_beam_search_of_every_alpha(seed):
    """What decoding.alpha=auto relies on: beam_candidates rescored == beam_search with that alpha."""
    model = tiny_model(seed=seed)
    src, lengths = batch()
    limits = {"max_len_a": 1.0, "max_len_b": 5}
    candidates = beam_candidates(model, src, lengths, DecodingSettings(beam=4, **limits))
    for alpha in (0.0, 1.0, 5.0):
        searched = beam_search(model, src, lengths, beam_size=4, alpha=alpha, **limits)
        rescored = [hyps[best_for_alpha(hyps, alpha)] for hyps in candidates]
        assert [h.tokens for h in rescored] == [hyps[0].tokens for hyps in searched]


def ensemble_log_probs(models, src, lengths, prefix):
    """Hand-computed: the mean over the models of each one's own next-token log-probabilities after
    ``prefix``, one (V,) tensor per position of ``prefix`` + 1."""
    per_model = []
    for model in models:
        state, previous, steps = model.encode(src, lengths), BOS_ID, []
        for token in [*prefix, None]:
            log_probs, state = model.decode_step(torch.tensor([previous]), state)
            steps.append(log_probs[0])
            previous = token
        per_model.append(torch.stack(steps))
    return sum(per_model) / len(models)  # (len(prefix) + 1, V)


@torch.no_grad()
@pytest.mark.parametrize("beam", [1, 4])
def test_an_ensemble_of_different_models_searches_with_the_mean_of_their_log_probabilities(beam):
    models = [tiny_model(seed=3), tiny_model(seed=4, attention="bahdanau")]
    ensemble = Ensemble(models)
    src, lengths = batch()
    results = beam_search(ensemble, src, lengths, beam_size=beam, alpha=0.0, max_len_a=1.0, max_len_b=4)
    singles = [
        beam_search(m, src, lengths, beam_size=beam, alpha=0.0, max_len_a=1.0, max_len_b=4) for m in models
    ]
    assert any(  # the models disagree, so the test can tell a mean from either model
        [h.tokens for (h,) in single] != [h.tokens for (h,) in results] for single in singles
    )
    for i, (h,) in enumerate(results):
        sentence = src[i : i + 1, : lengths[i]], lengths[i : i + 1]
        mean = ensemble_log_probs(models, *sentence, h.tokens)  # (T + 1, V)
        targets = torch.tensor([*h.tokens, EOS_ID])
        assert h.log_prob == pytest.approx(float(mean.gather(1, targets.unsqueeze(1)).sum()), abs=1e-4)
        if beam == 1:  # greedy: each token is the argmax of the mean (EOS only at the end)
            assert mean[: len(h.tokens)].argmax(dim=1).tolist() == h.tokens
