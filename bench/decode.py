"""Decoding speed on the Bible test split: batched greedy, batched beam, and beam one sentence at a time.

    python bench/decode.py --ckpt outputs/.../checkpoints/best-....ckpt [--limit N] [--threads T]

Prints sentences/s and output tokens/s of each (batched: the median of ``--repeats`` runs), the
speed-up of batching for beam search, and whether batched and one-at-a-time beam search gave
identical translations. The test split is rebuilt from the checkpoint's own data configuration, so it
is the split the model was scored on.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from seq2seq.data import load_bible
from seq2seq.translator import DEFAULT_BATCH_TOKENS, SearchSettings, Translator


def timed(
    translator: Translator, sources: list[str], settings: SearchSettings, batch_tokens: int, repeats: int = 1
) -> tuple[list[str], float, int]:
    """Translations, the median seconds over ``repeats`` runs, and the output tokens."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        results = translator.translate_nbest(sources, settings, batch_tokens)
        times.append(time.perf_counter() - started)
    texts = [hyps[0][0] for hyps in results]
    tokens = sum(len(hyps[0][1].tokens) for hyps in results)
    return texts, statistics.median(times), tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint of a model trained on data=bible")
    parser.add_argument("--limit", type=int, default=1000, help="first N test sentences")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=SearchSettings.alpha, help="length penalty")
    parser.add_argument("--batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS)
    parser.add_argument("--repeats", type=int, default=3, help="batched runs, the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    translator = Translator.from_checkpoint(args.ckpt)
    corpus_config = translator.run_config.get("data", {}).get("corpus", {})
    if corpus_config.get("_target_") != "seq2seq.data.load_bible":
        raise SystemExit(f"{args.ckpt} was not trained on data=bible; this benchmark needs its test split")
    corpus = load_bible(**{k: v for k, v in corpus_config.items() if not k.startswith("_")})
    sources = corpus.test.src[: args.limit]
    print(
        f"{len(sources)} test sentences ({corpus.test.origin}); beam {args.beam}, alpha {args.alpha};"
        f" torch threads: {torch.get_num_threads()}"
    )

    greedy = SearchSettings(beam=1)
    beam = SearchSettings(beam=args.beam, alpha=args.alpha)
    rows = []
    _, seconds, tokens = timed(translator, sources, greedy, args.batch_tokens, args.repeats)
    rows.append(("greedy, batched", seconds, tokens))
    batched, seconds, tokens = timed(translator, sources, beam, args.batch_tokens, args.repeats)
    rows.append((f"beam {args.beam}, batched", seconds, tokens))
    one_by_one, seconds_single, tokens_single = [], 0.0, 0
    for sentence in sources:
        texts, seconds, tokens = timed(translator, [sentence], beam, args.batch_tokens)
        one_by_one += texts
        seconds_single += seconds
        tokens_single += tokens
    rows.append((f"beam {args.beam}, one sentence at a time", seconds_single, tokens_single))

    print(f"{'mode':<34}{'seconds':>10}{'sentences/s':>14}{'tokens/s':>12}")
    for name, seconds, tokens in rows:
        print(f"{name:<34}{seconds:>10.1f}{len(sources) / seconds:>14.1f}{tokens / seconds:>12.0f}")
    print(f"batched beam {args.beam} vs one at a time: {seconds_single / rows[1][1]:.1f}x faster")
    same = sum(a == b for a, b in zip(batched, one_by_one, strict=True))
    print(f"identical translations, batched vs one at a time: {same} of {len(sources)}")


if __name__ == "__main__":
    main()
