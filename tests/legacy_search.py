"""Beam and greedy search as seq2seq/search.py had them before issue 45 (prefixes re-concatenated at
every step, finished hypotheses kept one at a time on the host): the reference that the faster search
must match output for output. Only the tests import it."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from seq2seq.decoding import UNTUNED_ALPHA, DecodingSettings
from seq2seq.model import Seq2Seq
from seq2seq.search import Hypothesis, length_penalty, output_limits
from seq2seq.tokenization import BOS_ID, EOS_ID


@torch.no_grad()
def greedy_search(
    model: Seq2Seq,
    src: Tensor,
    src_lengths: Tensor,
    max_len_a: float = DecodingSettings.max_len_a,
    max_len_b: int = DecodingSettings.max_len_b,
    min_len: int = 0,
) -> list[Hypothesis]:
    """The most probable next token at each step, for a whole batch at once.

    src: (batch, src_len) ids; src_lengths: (batch,). EOS is not chosen before ``min_len`` tokens
    unless the length limit is reached first. Returns one hypothesis per sentence, in order.
    """
    batch = src.size(0)
    limits = output_limits(src_lengths, max_len_a, max_len_b).to(src.device)
    min_lens = limits.clamp(max=min_len)
    state = model.encode(src, src_lengths)
    tokens = torch.full((batch,), BOS_ID, dtype=torch.long, device=src.device)
    alive = torch.arange(batch, device=src.device)  # sentence of each row still decoding
    outputs = torch.zeros(batch, int(limits.max()) + 1, dtype=torch.long, device=src.device)
    log_probs_sum = torch.zeros(batch, device=src.device)
    lengths = torch.zeros(batch, dtype=torch.long, device=src.device)
    step = 0
    while alive.numel():
        log_probs, state = model.decode_step(tokens, state)  # (n, V)
        allowed = log_probs.masked_fill((min_lens[alive] > step).unsqueeze(1) & _is_eos(log_probs), -math.inf)
        best_log_prob, tokens = allowed.max(dim=-1)
        at_limit = limits[alive] <= step
        tokens = torch.where(at_limit, EOS_ID, tokens)
        best_log_prob = torch.where(at_limit, log_probs[:, EOS_ID], best_log_prob)
        outputs[alive, step] = tokens
        log_probs_sum[alive] += best_log_prob
        ended = tokens == EOS_ID
        lengths[alive[ended]] = step
        if ended.any():
            keep = (~ended).nonzero().squeeze(1)
            alive, tokens, state = alive[keep], tokens[keep], state.select(keep)
        step += 1
    return [
        Hypothesis(outputs[i, : lengths[i]].tolist(), float(log_probs_sum[i]), float(log_probs_sum[i]))
        for i in range(batch)
    ]


def _is_eos(log_probs: Tensor) -> Tensor:
    """(1, V) mask of the EOS column."""
    return (torch.arange(log_probs.size(-1), device=log_probs.device) == EOS_ID).unsqueeze(0)


def beam_search(
    model: Seq2Seq,
    src: Tensor,
    src_lengths: Tensor,
    beam_size: int = DecodingSettings.beam,
    alpha: float = UNTUNED_ALPHA,
    max_len_a: float = DecodingSettings.max_len_a,
    max_len_b: int = DecodingSettings.max_len_b,
    min_len: int = 0,
    nbest: int = 1,
) -> list[list[Hypothesis]]:
    """Batched beam search with GNMT length normalization.

    All sentences and their ``beam_size`` beams are decoded together. A sentence is done once it has
    ``beam_size`` finished hypotheses, or once it has ``nbest`` and no open hypothesis can still beat
    them (log-probabilities only fall, so for ``alpha >= 0`` an open hypothesis scores at most its
    log-probability over the penalty of the longest allowed output). Done sentences leave the batch.
    EOS is not allowed before ``min_len`` tokens, or before the length limit where that is shorter.

    Returns, per sentence in input order, its ``nbest`` hypotheses, best first.
    """
    if beam_size < 1:
        raise ValueError(f"beam size must be at least 1, got {beam_size}")
    if not 1 <= nbest <= beam_size:
        raise ValueError(f"nbest must be between 1 and the beam size {beam_size}, got {nbest}")
    if not alpha >= 0:
        raise ValueError(f"alpha must be at least 0 (the early stop relies on it), got {alpha}")
    finished = _finished_hypotheses(
        model, src, src_lengths, beam_size, alpha, max_len_a, max_len_b, min_len, nbest
    )
    return [sorted(hyps, key=lambda h: h.score, reverse=True)[:nbest] for hyps in finished]


def beam_candidates(
    model: Seq2Seq, src: Tensor, src_lengths: Tensor, settings: DecodingSettings
) -> list[list[Hypothesis]]:
    """Every hypothesis beam search finishes when each sentence runs until ``beam_size`` have ended.

    The beams themselves do not depend on the length penalty (they are ranked by log-probability), and
    a search stopped early for some ``alpha >= 0`` only skips hypotheses that score below its best. So
    :func:`best_for_alpha` over these candidates is what ``beam_search(..., alpha)`` returns, for every
    alpha, from one search. ``settings.alpha`` plays no part; scores are those of ``alpha=0``.
    """
    limits = settings.max_len_a, settings.max_len_b, settings.min_len
    return _finished_hypotheses(model, src, src_lengths, settings.beam, 0.0, *limits, nbest=settings.beam)


@torch.no_grad()
def _finished_hypotheses(
    model: Seq2Seq,
    src: Tensor,
    src_lengths: Tensor,
    beam_size: int,
    alpha: float,
    max_len_a: float,
    max_len_b: int,
    min_len: int,
    nbest: int,
) -> list[list[Hypothesis]]:
    """The hypotheses of each sentence that ended before its search stopped, in the order they ended."""
    device, batch, k = src.device, src.size(0), beam_size
    limits = output_limits(src_lengths, max_len_a, max_len_b).to(device)
    # EOS is blocked before min_len, but never at the limit, where it is the only token allowed.
    min_lens = limits.clamp(max=min_len)
    # An open hypothesis's best possible score: its log-prob over the longest output's penalty.
    best_penalty = length_penalty(limits + 1, alpha).float()

    state = model.encode(src, src_lengths).select(torch.arange(batch, device=device).repeat_interleave(k))
    scores = torch.full((batch, k), -math.inf, device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    tokens = torch.full((batch * k,), BOS_ID, dtype=torch.long, device=device)
    prefixes = torch.empty(batch * k, 0, dtype=torch.long, device=device)
    active = torch.arange(batch, device=device)  # sentence of each group of k rows
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    nth_best = torch.full((batch,), -math.inf, device=device)  # score of the nbest-th finished one

    step = 0
    while active.numel():
        n = active.numel()
        log_probs, state = model.decode_step(tokens, state)
        log_probs = log_probs.view(n, k, -1)  # (n, k, V)
        vocab = log_probs.size(-1)
        too_short = (min_lens[active] > step).view(n, 1, 1)
        log_probs = log_probs.masked_fill(too_short & _is_eos(log_probs.view(n * k, -1)), -math.inf)
        at_limit = (limits[active] <= step).view(n, 1, 1)
        if at_limit.any():
            only_eos = torch.full_like(log_probs, -math.inf)
            only_eos[..., EOS_ID] = log_probs[..., EOS_ID]
            log_probs = torch.where(at_limit, only_eos, log_probs)
        candidates = (scores.unsqueeze(-1) + log_probs).view(n, k * vocab)
        top_scores, top_ids = candidates.topk(min(2 * k, k * vocab), dim=1)  # (n, 2k), best first
        top_beams, top_tokens = top_ids // vocab, top_ids % vocab
        is_eos = top_tokens == EOS_ID

        # EOS among the k best candidates ends a hypothesis.
        ends = is_eos[:, :k] & top_scores[:, :k].isfinite()
        if ends.any():
            penalty = length_penalty(step + 1, alpha)
            for row, col in ends.nonzero().tolist():
                sentence = int(active[row])
                log_prob = float(top_scores[row, col])
                prefix = prefixes[row * k + int(top_beams[row, col])].tolist()
                finished[sentence].append(Hypothesis(prefix, log_prob, log_prob / penalty))
                if len(finished[sentence]) >= nbest:
                    ranked = sorted((h.score for h in finished[sentence]), reverse=True)
                    nth_best[sentence] = ranked[nbest - 1]

        # The k best candidates that do not end go on; new row j continues old row reorder[j].
        order_key = is_eos.long() * top_ids.size(1) + torch.arange(top_ids.size(1), device=device)
        pick = order_key.topk(k, dim=1, largest=False).indices  # (n, k)
        scores = top_scores.gather(1, pick)
        tokens = top_tokens.gather(1, pick).view(-1)
        reorder = (torch.arange(n, device=device).unsqueeze(1) * k + top_beams.gather(1, pick)).view(-1)

        num_finished = torch.tensor([len(finished[s]) for s in active.tolist()], device=device)
        cannot_improve = scores.max(dim=1).values / best_penalty[active] <= nth_best[active]
        done = (num_finished >= k) | ((num_finished >= nbest) & cannot_improve)
        if done.any():
            keep = (~done).nonzero().squeeze(1)
            keep_rows = (keep.unsqueeze(1) * k + torch.arange(k, device=device)).view(-1)
            active, scores, tokens, reorder = (
                active[keep],
                scores[keep],
                tokens[keep_rows],
                reorder[keep_rows],
            )
        prefixes = torch.cat([prefixes.index_select(0, reorder), tokens.unsqueeze(1)], dim=1)
        state = state.select(reorder)
        step += 1

    return finished
