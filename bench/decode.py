"""Decoding speed on the Bible test split: batched greedy, batched beam, and beam one sentence at a time;
and the cost of ``decoding.alpha=auto`` on the validation split.

    python bench/decode.py --ckpt outputs/.../checkpoints/best-....ckpt [--limit N] [--threads T]
        [--precisions fp32 bf16] [--device cpu|cuda]

Prints sentences/s, output tokens/s and GFLOP/s (against the CPU's peak and against plain training
steps of the same model, measured in the same run) of each (batched: the median of ``--repeats`` runs), the
speed-up of batching for beam search, and whether batched and one-at-a-time beam search gave
identical translations. With several ``--precisions``, the batched modes run in each, side by side
(``--chunk`` sentences at a time, each precision in turn), with the BLEU of each against the
references and how many translations match the first precision's (one sentence at a time runs in
the first only). The test split is rebuilt from the checkpoint's own data configuration, so it is the
split the model was scored on. Then, on the validation split, what choosing alpha from
``--alpha-grid`` costs (one beam search rescored for every alpha, as training does) against one
beam search decoding of that split and against decoding it once per alpha, with a check that the
choice's translations are those of a beam search with the chosen alpha. ``--skip-speed`` runs only that,
``--skip-alpha`` all but that.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from flops import FlopCounter, peak_flops

from seq2seq.data.corpora import load_bible
from seq2seq.data.encoded import EncodedSplit
from seq2seq.data.sampler import TokenBucketBatchSampler
from seq2seq.decoding import DecodingSettings
from seq2seq.evaluation import choose_alpha
from seq2seq.flops import training_flops
from seq2seq.metrics import corpus_scores
from seq2seq.precision import DECODING_PRECISIONS
from seq2seq.tokenization import PAD_ID
from seq2seq.translator import Translator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests/legacy_search.py
import seq2seq.translator as translator_module
from tests import legacy_search

DEFAULTS = DecodingSettings()
# The rows of --levers: (name, the search before issue 45?, decoding options)
LEVERS = (
    ("today (search before issue 45)", True, {"shortlist": False, "quantize": "none"}),
    ("search: no prefix copies", False, {"shortlist": False, "quantize": "none"}),
    ("shortlist", False, {"shortlist": True, "quantize": "none"}),
    ("int8", False, {"shortlist": False, "quantize": "int8"}),
    ("all (the defaults)", False, {}),
)


def timed(
    translator: Translator, sources: list[str], settings: DecodingSettings, repeats: int = 1
) -> tuple[list[str], float, int, int]:
    """Translations, the median seconds over ``repeats`` runs, the output tokens and the FLOPs of a run."""
    times = []
    counter = FlopCounter(translator.model)
    for _ in range(repeats):
        started = time.perf_counter()
        results = translator.translate_nbest(sources, settings)
        times.append(time.perf_counter() - started)
    counter.remove()
    texts = [hyps[0][0] for hyps in results]
    tokens = sum(len(hyps[0][1].tokens) for hyps in results)
    return texts, statistics.median(times), tokens, counter.flops // repeats


def side_by_side(
    translators: list[Translator], sources: list[str], settings: DecodingSettings, args: argparse.Namespace
) -> list[tuple[list[str], float, int, int]]:
    """:func:`timed` for each translator, summed over chunks of ``args.chunk`` sentences that each
    translator takes in turn (the first one rotating), so that load from other processes falls on all
    alike. Per translator: translations, seconds, output tokens, FLOPs."""
    totals = [([], 0.0, 0, 0) for _ in translators]
    chunk = args.chunk or len(sources)
    for number, start in enumerate(range(0, len(sources), chunk)):
        for index in [(number + k) % len(translators) for k in range(len(translators))]:
            texts, *figures = timed(
                translators[index], sources[start : start + chunk], settings, args.repeats
            )
            done_texts, *done = totals[index]
            totals[index] = (done_texts + texts, *(a + b for a, b in zip(done, figures, strict=True)))
    return totals


def training_flop_rate(translator: Translator, src: list[str], tgt: list[str], steps: int = 10) -> float:
    """FLOP/s of plain training steps (forward, backward, AdamW) of a copy of the model, on batches of
    the given pairs as training builds them (3,000 tokens, one source length per batch)."""
    tokenizer = translator.tokenizer
    split = EncodedSplit(tokenizer.encode_src(src), tokenizer.encode_tgt(tgt))
    sampler = TokenBucketBatchSampler(
        split.src_lengths(), split.tgt_lengths(), 3000, shuffle=True, equal_source_length=True
    )
    device = translator.device
    batches = [
        dataclasses.replace(b, src=b.src.to(device), tgt_in=b.tgt_in.to(device), tgt_out=b.tgt_out.to(device))
        for b in map(split.collate, sampler.batches(epoch=0)[: steps + 2])
    ]
    model = copy.deepcopy(translator.model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    started = 0.0
    for step, batch in enumerate(batches):
        if step == 2:  # after two warm-up steps
            started = time.perf_counter()
        real = batch.tgt_out != PAD_ID
        outputs = model(batch.src, batch.src_lengths, batch.tgt_in)
        torch.nn.functional.cross_entropy(model.logits(outputs[real]), batch.tgt_out[real]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type != "cpu":
        torch.accelerator.synchronize()
    return sum(training_flops(model, b) for b in batches[2:]) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint of a model trained on data=bible")
    parser.add_argument("--limit", type=int, default=1000, help="first N test sentences")
    parser.add_argument("--beam", type=int, default=DEFAULTS.beam)
    parser.add_argument("--alpha", default=DEFAULTS.alpha, help="length penalty (auto: the checkpoint's)")
    parser.add_argument("--batch-tokens", type=int, default=DEFAULTS.batch_tokens)
    parser.add_argument("--alpha-grid", type=float, nargs="+", default=[0.6, 1.0, 1.5, 2.0])
    parser.add_argument("--skip-speed", action="store_true", help="measure only the cost of alpha=auto")
    parser.add_argument("--skip-alpha", action="store_true", help="measure only the speed")
    parser.add_argument("--repeats", type=int, default=3, help="batched runs, the median is reported")
    parser.add_argument(
        "--device", default="cpu", help="cpu (the default), cuda or cuda:N: where the model decodes"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--precisions", nargs="+", default=["fp32"], choices=DECODING_PRECISIONS, help="e.g. fp32 bf16"
    )
    parser.add_argument("--skip-one-by-one", action="store_true", help="only the batched modes")
    parser.add_argument("--levers", action="store_true", help="the faster-decoding levers side by side")
    parser.add_argument(
        "--chunk", type=int, default=0, help="batched modes: sentences per turn of each precision (0: all)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    translator = Translator.from_checkpoint(args.ckpt, args.device)
    corpus_config = translator.run_config.get("data", {}).get("corpus", {})
    # The target as conf/data/bible.yaml names it now, or as checkpoints trained before named it.
    if corpus_config.get("_target_") not in ("seq2seq.data.corpora.load_bible", "seq2seq.data.load_bible"):
        raise SystemExit(f"{args.ckpt} was not trained on data=bible; this benchmark needs its test split")
    corpus = load_bible(**{k: v for k, v in corpus_config.items() if not k.startswith("_")})
    alpha = args.alpha if args.alpha == "auto" else float(args.alpha)
    beam = translator.settings(beam=args.beam, alpha=alpha, batch_tokens=args.batch_tokens)
    if args.levers:
        levers(args, corpus.test, beam)
        return
    # The precisions compared as they are: no shortlist, no int8 (--levers measures those)
    plain = dataclasses.replace(beam, shortlist=False, quantize="none")
    if not args.skip_speed:
        speed(args, corpus.test, plain)
    if not args.skip_alpha:
        alpha_cost(translator, corpus.valid, plain, args.alpha_grid, args.limit)


def speed(args: argparse.Namespace, test, beam: DecodingSettings) -> None:
    """Greedy and beam search, batched in each precision, and beam search one sentence at a time."""
    sources, references = test.src[: args.limit], test.tgt[: args.limit]
    print(
        f"{len(sources)} test sentences ({test.origin}); beam {beam.beam}, alpha {beam.alpha};"
        f" device {args.device}; torch threads: {torch.get_num_threads()};"
        " peak: a measured matrix product in the row's precision"
    )
    greedy = dataclasses.replace(beam, beam=1)
    rows = []  # (mode, precision, seconds, output tokens, FLOPs, translations)
    translators = [Translator.from_checkpoint(args.ckpt, args.device, p) for p in args.precisions]
    for mode, settings in (("greedy, batched", greedy), (f"beam {beam.beam}, batched", beam)):
        results = side_by_side(translators, sources, settings, args)
        for translator, (texts, *figures) in zip(translators, results, strict=True):
            rows.append((mode, translator.precision, *figures, texts))
    first = translators[0]
    if not args.skip_one_by_one:
        one_by_one, totals = [], [0.0, 0, 0]
        for sentence in sources:
            texts, *figures = timed(first, [sentence], beam)
            one_by_one += texts
            totals = [total + figure for total, figure in zip(totals, figures, strict=True)]
        rows.append((f"beam {beam.beam}, one sentence at a time", first.precision, *totals, one_by_one))
    train_rate = training_flop_rate(first, test.src, test.tgt)

    print(
        f"{'mode':<34}{'precision':<10}{'seconds':>9}{'sentences/s':>13}{'tokens/s':>10}"
        f"{'GFLOP/s':>9}{'of peak':>9}{'of training':>13}{'BLEU':>7}{'same':>6}"
    )
    # same: translations identical to the first row of the same mode (first precision, or batched)
    reference_texts = {}
    for mode, precision, seconds, tokens, flops, texts in rows:
        rate = flops / seconds
        compared = reference_texts.setdefault(mode.replace("one sentence at a time", "batched"), texts)
        same = sum(a == b for a, b in zip(texts, compared, strict=True))
        print(
            f"{mode:<34}{precision:<10}{seconds:>9.1f}"
            f"{len(sources) / seconds:>13.1f}{tokens / seconds:>10.0f}"
            f"{rate / 1e9:>9.1f}{rate / peak_flops(precision, args.device):>9.1%}{rate / train_rate:>13.1%}"
            f"{corpus_scores(texts, references).bleu:>7.2f}{same:>6}"
        )
    print(
        f"{'training steps (plain loop, fp32)':<44}{'':>32}{train_rate / 1e9:>9.1f}"
        f"{train_rate / peak_flops('fp32', args.device):>9.1%}"
    )
    if not args.skip_one_by_one:
        print(f"batched beam {beam.beam} vs one at a time: {rows[-1][2] / rows[1][2]:.1f}x faster")


@contextlib.contextmanager
def search_before_issue_45() -> Iterator[None]:
    """The translator decodes with the search as it was before issue 45 (no shortlist, no int8)."""

    def decode(
        model: torch.nn.Module,
        src: torch.Tensor,
        src_lengths: torch.Tensor,
        settings: DecodingSettings,
        shortlist: None = None,
    ) -> list[list[legacy_search.Hypothesis]]:
        limits = (settings.max_len_a, settings.max_len_b, settings.min_len)
        if settings.beam == 1:
            return [[h] for h in legacy_search.greedy_search(model, src, src_lengths, *limits)]
        return legacy_search.beam_search(
            model, src, src_lengths, settings.beam, settings.alpha, *limits, settings.nbest
        )

    current = translator_module.decode
    translator_module.decode = decode
    try:
        yield
    finally:
        translator_module.decode = current


def levers(args: argparse.Namespace, test, beam: DecodingSettings) -> None:
    """Beam search today and with each lever of issue 45, side by side (see the module's docstring)."""
    sources, references = test.src[: args.limit], test.tgt[: args.limit]
    rows = [
        (f"{name}", precision, legacy, dataclasses.replace(beam, **options))
        for precision in args.precisions
        for name, legacy, options in LEVERS
    ]
    translators = {p: Translator.from_checkpoint(args.ckpt, args.device, p) for p in args.precisions}
    for translator in translators.values():  # the shortlist and the int8 model, made before timing
        translator.lexical_table()
        translator.translate(sources[:2], quantize="int8")
    print(
        f"{len(sources)} test sentences ({test.origin}); beam {beam.beam}, alpha {beam.alpha}; device"
        f" {args.device}; torch threads: {torch.get_num_threads()}; the fastest of {args.repeats} per chunk"
        f" of {args.chunk or len(sources)}"
    )
    chunk = args.chunk or len(sources)
    texts = [[] for _ in rows]
    wall, cpu = [0.0] * len(rows), [0.0] * len(rows)
    for number, start in enumerate(range(0, len(sources), chunk)):
        part = sources[start : start + chunk]
        fastest = [(float("inf"), float("inf"))] * len(rows)
        for _ in range(args.repeats):
            for index in [(number + k) % len(rows) for k in range(len(rows))]:
                name, precision, legacy, settings = rows[index]
                with search_before_issue_45() if legacy else contextlib.nullcontext():
                    started, started_cpu = time.perf_counter(), time.process_time()
                    out = translators[precision].translate(part, **dataclasses.asdict(settings))
                    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - started_cpu
                fastest[index] = min(fastest[index], (seconds, cpu_seconds))
                if len(texts[index]) == start:
                    texts[index] += out
        for index, (seconds, cpu_seconds) in enumerate(fastest):
            wall[index] += seconds
            cpu[index] += cpu_seconds
    print(
        f"{'decoding':<34}{'precision':<10}{'seconds':>9}{'sentences/s':>13}{'speed-up':>10}"
        f"{'CPU s':>8}{'speed-up':>10}{'BLEU':>7}{'same':>6}"
    )
    for index, (name, precision, _, _) in enumerate(rows):
        today = index - index % len(LEVERS)  # the first row of this precision
        same = sum(a == b for a, b in zip(texts[index], texts[today], strict=True))
        print(
            f"{name:<34}{precision:<10}{wall[index]:>9.1f}{len(sources) / wall[index]:>13.1f}"
            f"{wall[today] / wall[index]:>9.2f}x{cpu[index]:>8.1f}{cpu[today] / cpu[index]:>9.2f}x"
            f"{corpus_scores(texts[index], references).bleu:>7.2f}{same:>6}"
        )


def alpha_cost(translator: Translator, valid, beam: DecodingSettings, grid: list[float], limit: int) -> None:
    """decoding.alpha=auto on the validation split, timed against plain beam search decodings of it."""
    sources, references = valid.src[:limit], valid.tgt[:limit]
    print(
        f"\nalpha=auto on {len(sources)} validation sentences ({valid.origin}), beam {beam.beam}, grid {grid}"
    )
    choice = choose_alpha(translator, sources, references, beam, grid)
    once = {}
    for alpha in grid:
        started = time.perf_counter()
        texts = translator.translate(sources, **{**dataclasses.asdict(beam), "alpha": alpha})
        once[alpha] = (texts, time.perf_counter() - started)
    beam_seconds = statistics.median(seconds for _, seconds in once.values())
    print(f"{'one beam search decoding (median of the grid)':<48}{beam_seconds:>8.1f} s")
    print(f"{'alpha=auto (one search, rescored per alpha)':<48}{choice.seconds:>8.1f} s")
    print(f"{'a decoding per alpha':<48}{sum(s for _, s in once.values()):>8.1f} s")
    print(f"alpha=auto costs {choice.seconds / beam_seconds:.2f} beam search decodings of the split")
    table = ", ".join(f"{alpha:g}: {bleu:.2f}" for alpha, bleu in choice.bleu.items())
    print(f"BLEU by alpha: {table}; chosen {choice.alpha:g}")
    same = sum(
        rescored == searched
        for alpha in grid
        for rescored, searched in zip(choice.translations[alpha], once[alpha][0], strict=True)
    )
    print(
        f"rescored translations identical to beam search with that alpha: {same} of"
        f" {len(sources) * len(grid)}"
    )


if __name__ == "__main__":
    main()
