"""Batched greedy and beam search over the model's single-step decoder API.

Both work on any model with ``encode(src, src_lengths) -> state`` and
``decode_step(tokens, state) -> (log_probs, state)``, where the state has ``select(index)``.
Sentences that are finished leave the batch, so the remaining work shrinks as decoding goes on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from seq2seq.decoding import AUTO, UNTUNED_ALPHA, DecodingSettings
from seq2seq.model import Seq2Seq
from seq2seq.shortlist import Shortlist
from seq2seq.tokenization import BOS_ID, EOS_ID


@dataclass
class Hypothesis:
    """tokens: output ids without BOS/EOS; log_prob: model log-probability (EOS included);
    score: what the search ranked by (``log_prob`` over the length penalty)."""

    tokens: list[int]
    log_prob: float
    score: float


def output_limits(src_lengths: Tensor, max_len_a: float, max_len_b: int) -> Tensor:
    """Most output tokens (EOS excluded) per sentence: ``a * source_length + b``, at least 1."""
    return (src_lengths.float() * max_len_a + max_len_b).floor().long().clamp(min=1)


def length_penalty(length: int | Tensor, alpha: float) -> float | Tensor:
    """GNMT length penalty ((5 + length) / 6) ** alpha (Wu et al. 2016); 1 when alpha is 0."""
    return ((5 + length) / 6) ** alpha


@torch.no_grad()
def greedy_search(
    model: Seq2Seq,
    src: Tensor,
    src_lengths: Tensor,
    max_len_a: float = DecodingSettings.max_len_a,
    max_len_b: int = DecodingSettings.max_len_b,
    min_len: int = 0,
    shortlist: Shortlist | None = None,
) -> list[Hypothesis]:
    """The most probable next token at each step, for a whole batch at once.

    src: (batch, src_len) ids; src_lengths: (batch,). EOS is not chosen before ``min_len`` tokens
    unless the length limit is reached first. With a ``shortlist`` each sentence chooses among its own
    target ids. Returns one hypothesis per sentence, in order.
    """
    batch = src.size(0)
    limits = output_limits(src_lengths, max_len_a, max_len_b).to(src.device)
    min_lens = limits.clamp(max=min_len)
    state = model.encode(src, src_lengths)
    output, eos = _output(model, shortlist, src.device)
    tokens = torch.full((batch,), BOS_ID, dtype=torch.long, device=src.device)
    alive = torch.arange(batch, device=src.device)  # sentence of each row still decoding
    outputs = torch.zeros(batch, int(limits.max()) + 1, dtype=torch.long, device=src.device)
    log_probs_sum = torch.zeros(batch, device=src.device)
    lengths = torch.zeros(batch, dtype=torch.long, device=src.device)
    step = 0
    while alive.numel():
        log_probs, state = _step(model, tokens, state, output)  # (n, V), or (n, S) shortlisted
        if min_len > step:
            too_short = min_lens[alive] > step
            log_probs[:, eos] = log_probs[:, eos].masked_fill(too_short, -math.inf)
        best_log_prob, columns = log_probs.max(dim=-1)
        tokens = columns if output is None else output.token_ids(columns)
        at_limit = limits[alive] <= step
        tokens = torch.where(at_limit, EOS_ID, tokens)
        best_log_prob = torch.where(at_limit, log_probs[:, eos], best_log_prob)
        outputs[alive, step] = tokens
        log_probs_sum[alive] += best_log_prob
        ended = tokens == EOS_ID
        lengths[alive[ended]] = step
        if ended.any():
            keep = (~ended).nonzero().squeeze(1)
            alive, tokens, state = alive[keep], tokens[keep], state.select(keep)
            output = None if output is None else output.select(keep)
        step += 1
    outputs, lengths, log_probs_sum = outputs.tolist(), lengths.tolist(), log_probs_sum.tolist()
    return [Hypothesis(outputs[i][: lengths[i]], log_probs_sum[i], log_probs_sum[i]) for i in range(batch)]


def _output(model: Seq2Seq, shortlist: Shortlist | None, device: torch.device) -> tuple[Any, int]:
    """The model's output layer cut to ``shortlist`` (None: the whole vocabulary), and the column of
    EOS in the log-probabilities (a shortlist puts it first)."""
    if shortlist is None:
        return None, EOS_ID
    return model.shortlist(shortlist.ids.to(device), shortlist.allowed.to(device)), 0


def _step(model: Seq2Seq, tokens: Tensor, state: Any, output: Any) -> tuple[Tensor, Any]:
    """``model.decode_step``, with the shortlisted output layer where there is one."""
    return model.decode_step(tokens, state) if output is None else model.decode_step(tokens, state, output)


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
    shortlist: Shortlist | None = None,
) -> list[list[Hypothesis]]:
    """Batched beam search with GNMT length normalization.

    All sentences and their ``beam_size`` beams are decoded together. A sentence is done once it has
    ``beam_size`` finished hypotheses, or once it has ``nbest`` and no open hypothesis can still beat
    them (log-probabilities only fall, so for ``alpha >= 0`` an open hypothesis scores at most its
    log-probability over the penalty of the longest allowed output). Done sentences leave the batch.
    EOS is not allowed before ``min_len`` tokens, or before the length limit where that is shorter.
    With a ``shortlist`` each sentence's beams extend only with its own target ids.

    Returns, per sentence in input order, its ``nbest`` hypotheses, best first (fewer where fewer
    outputs exist within the limits and the shortlist).
    """
    if beam_size < 1:
        raise ValueError(f"beam size must be at least 1, got {beam_size}")
    if not 1 <= nbest <= beam_size:
        raise ValueError(f"nbest must be between 1 and the beam size {beam_size}, got {nbest}")
    if not alpha >= 0:
        raise ValueError(f"alpha must be at least 0 (the early stop relies on it), got {alpha}")
    finished = _finished_hypotheses(
        model, src, src_lengths, beam_size, alpha, max_len_a, max_len_b, min_len, nbest, shortlist
    )
    return [sorted(hyps, key=lambda h: h.score, reverse=True)[:nbest] for hyps in finished]


def beam_candidates(
    model: Seq2Seq,
    src: Tensor,
    src_lengths: Tensor,
    settings: DecodingSettings,
    shortlist: Shortlist | None = None,
) -> list[list[Hypothesis]]:
    """Every hypothesis beam search finishes when each sentence runs until ``beam_size`` have ended.

    The beams themselves do not depend on the length penalty (they are ranked by log-probability), and
    a search stopped early for some ``alpha >= 0`` only skips hypotheses that score below its best. So
    :func:`best_for_alpha` over these candidates is what ``beam_search(..., alpha)`` returns, for every
    alpha, from one search. ``settings.alpha`` plays no part; scores are those of ``alpha=0``.
    """
    limits = settings.max_len_a, settings.max_len_b, settings.min_len
    return _finished_hypotheses(
        model, src, src_lengths, settings.beam, 0.0, *limits, nbest=settings.beam, shortlist=shortlist
    )


def best_for_alpha(candidates: list[Hypothesis], alpha: float) -> int:
    """Index of the candidate with the best length-normalized score under ``alpha`` (the first on a tie,
    as beam search ranks)."""
    return max(
        range(len(candidates)),
        key=lambda i: candidates[i].log_prob / length_penalty(len(candidates[i].tokens) + 1, alpha),
    )


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
    shortlist: Shortlist | None = None,
) -> list[list[Hypothesis]]:
    """The hypotheses of each sentence that ended before its search stopped, in the order they ended.

    The bookkeeping stays on the device and costs the host one check a step (whether a sentence is
    done): finished hypotheses go into per-sentence slots, and each step keeps only its tokens and
    back-pointers, from which the finished outputs are read once at the end (no prefixes copied).
    """
    device, batch, k = src.device, src.size(0), beam_size
    limits = output_limits(src_lengths, max_len_a, max_len_b).to(device)
    # EOS is blocked before min_len, but never at the limit, where it is the only token allowed.
    min_lens = limits.clamp(max=min_len)
    # An open hypothesis's best possible score: its log-prob over the longest output's penalty.
    best_penalty = length_penalty(limits + 1, alpha).float()
    first_limit = int(limits.min())  # the first step at which a sentence of the batch is at its limit

    state = model.encode(src, src_lengths).select(torch.arange(batch, device=device).repeat_interleave(k))
    output, eos = _output(model, shortlist, device)
    scores = torch.full((batch, k), -math.inf, device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    tokens = torch.full((batch * k,), BOS_ID, dtype=torch.long, device=device)
    active = torch.arange(batch, device=device)  # sentence of each group of k rows
    # A sentence has fewer than k finished hypotheses while it runs and gains at most k a step: 2k slots
    # hold them in the order they end, and one more takes the writes of candidates that do not end.
    slots = 2 * k
    finished_log_prob = torch.full((batch, slots + 1), -math.inf, device=device)
    finished_score = torch.full((batch, slots + 1), -math.inf, device=device)
    finished_step = torch.zeros(batch, slots + 1, dtype=torch.long, device=device)
    finished_row = torch.zeros(batch, slots + 1, dtype=torch.long, device=device)
    num_finished = torch.zeros(batch, dtype=torch.long, device=device)
    nth_best = torch.full((batch,), -math.inf, device=device)  # score of the nbest-th finished one
    # Step t's input row r continues row parents[t - 1][r] of step t - 1 with token step_tokens[t - 1][r].
    step_tokens: list[Tensor] = []
    parents: list[Tensor] = []

    step = 0
    while active.numel():
        n = active.numel()
        log_probs, state = _step(model, tokens, state, output)
        log_probs = log_probs.view(n, k, -1)  # (n, k, V), or (n, k, S) shortlisted
        vocab = log_probs.size(-1)
        if min_len > step:
            too_short = (min_lens[active] > step).view(n, 1)
            log_probs[:, :, eos] = log_probs[:, :, eos].masked_fill(too_short, -math.inf)
        if step >= first_limit:
            at_limit = (limits[active] <= step).view(n, 1, 1)
            only_eos = torch.full_like(log_probs, -math.inf)
            only_eos[..., eos] = log_probs[..., eos]
            log_probs = torch.where(at_limit, only_eos, log_probs)
        candidates = (scores.unsqueeze(-1) + log_probs).view(n, k * vocab)
        top_scores, top_ids = candidates.topk(min(2 * k, k * vocab), dim=1)  # (n, 2k), best first
        top_beams, top_columns = top_ids // vocab, top_ids % vocab
        is_eos = top_columns == eos
        top_tokens = top_columns if output is None else output.token_ids(top_columns)

        # EOS among the k best candidates ends a hypothesis: into the sentence's next free slot.
        ends = is_eos[:, :k] & top_scores[:, :k].isfinite()  # (n, k)
        ended = ends.cumsum(dim=1)
        slot = torch.where(ends, num_finished[active].unsqueeze(1) + ended - 1, slots)
        where = (active.unsqueeze(1).expand(n, k), slot)
        finished_log_prob.index_put_(where, top_scores[:, :k])
        # As a Python float divided by the penalty and stored in fp32: the scores the search had before.
        penalty = length_penalty(step + 1, alpha)
        finished_score.index_put_(where, (top_scores[:, :k].double() / penalty).float())
        finished_step.index_put_(where, torch.full_like(slot, step))
        row = torch.arange(n, device=device).unsqueeze(1) * k + top_beams[:, :k]
        finished_row.index_put_(where, row)
        num_finished[active] += ended[:, -1]
        count = num_finished[active]
        nth = finished_score[active, :slots].topk(nbest, dim=1).values[:, -1]
        nth_best[active] = torch.where(count >= nbest, nth, -math.inf)

        # The k best candidates that do not end go on; new row j continues old row reorder[j].
        order_key = is_eos.long() * top_ids.size(1) + torch.arange(top_ids.size(1), device=device)
        pick = order_key.topk(k, dim=1, largest=False).indices  # (n, k)
        scores = top_scores.gather(1, pick)
        tokens = top_tokens.gather(1, pick).view(-1)
        reorder = (torch.arange(n, device=device).unsqueeze(1) * k + top_beams.gather(1, pick)).view(-1)

        best_open = scores.max(dim=1).values
        cannot_improve = best_open / best_penalty[active] <= nth_best[active]
        # No open hypothesis left (-inf): fewer than nbest outputs exist (a short limit, a small
        # shortlist or vocabulary), and waiting for more would never end.
        done = (count >= k) | ((count >= nbest) & cannot_improve) | (best_open == -math.inf)
        if done.any():
            keep = (~done).nonzero().squeeze(1)
            keep_rows = (keep.unsqueeze(1) * k + torch.arange(k, device=device)).view(-1)
            active, scores, tokens, reorder = (
                active[keep],
                scores[keep],
                tokens[keep_rows],
                reorder[keep_rows],
            )
            output = None if output is None else output.select(keep)
            if active.numel():
                first_limit = int(limits[active].min())
        step_tokens.append(tokens)
        parents.append(reorder)
        state = state.select(reorder)
        step += 1

    return _read_finished(
        num_finished, finished_log_prob, finished_step, finished_row, step_tokens, parents, alpha
    )


def _read_finished(
    num_finished: Tensor,
    log_probs: Tensor,
    steps: Tensor,
    rows: Tensor,
    step_tokens: list[Tensor],
    parents: list[Tensor],
    alpha: float,
) -> list[list[Hypothesis]]:
    """Each sentence's finished hypotheses, in slot order, their tokens read back through the steps'
    back-pointers: F hypotheses over T steps cost T vectorized lookups, on the host, after one copy.

    num_finished: (batch,); log_probs, steps, rows: (batch, slots) per slot its log-probability, the
    step it ended at and its row at that step; step_tokens, parents: per step, (rows,) tensors.
    """
    counts = num_finished.tolist()
    taken = torch.arange(log_probs.size(1), device=log_probs.device) < num_finished.unsqueeze(1)
    end_log_prob = log_probs[taken].tolist()
    end_step, end_row = steps[taken].cpu().numpy(), rows[taken].cpu().numpy()
    sizes = [t.numel() for t in step_tokens]
    history_tokens = torch.cat(step_tokens).cpu().numpy() if step_tokens else np.zeros(0, np.int64)
    history_parents = torch.cat(parents).cpu().numpy() if parents else np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    outputs = np.zeros((len(end_step), int(end_step.max(initial=0))), dtype=np.int64)
    pointer = end_row.copy()
    for position in range(outputs.shape[1] - 1, -1, -1):
        live = end_step > position  # the hypotheses with a token at this position
        at = pointer[live] + starts[position]
        outputs[live, position] = history_tokens[at]
        pointer[live] = history_parents[at]
    results: list[list[Hypothesis]] = []
    index = 0
    for count in counts:
        hyps = []
        for _ in range(count):
            length = int(end_step[index])
            log_prob = end_log_prob[index]
            tokens = outputs[index, :length].tolist()
            hyps.append(Hypothesis(tokens, log_prob, log_prob / length_penalty(length + 1, alpha)))
            index += 1
        results.append(hyps)
    return results


def decode(
    model: Seq2Seq,
    src: Tensor,
    src_lengths: Tensor,
    settings: DecodingSettings,
    shortlist: Shortlist | None = None,
) -> list[list[Hypothesis]]:
    """Search as ``settings`` say (greedy for ``beam=1``): per sentence, its ``nbest`` hypotheses; with
    a ``shortlist``, among each sentence's own target ids."""
    if settings.alpha == AUTO:
        raise ValueError(
            "alpha=auto must be resolved to a number before decoding (DecodingSettings.with_alpha)"
        )
    limits = {
        "max_len_a": settings.max_len_a,
        "max_len_b": settings.max_len_b,
        "min_len": settings.min_len,
        "shortlist": shortlist,
    }
    if settings.beam == 1:
        return [[h] for h in greedy_search(model, src, src_lengths, **limits)]
    return beam_search(model, src, src_lengths, settings.beam, settings.alpha, nbest=settings.nbest, **limits)
