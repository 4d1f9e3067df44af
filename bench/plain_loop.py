"""A yardstick: a plain PyTorch training loop (no Lightning, no Hydra) for a Bible pair, trained for a
given time, then greedy test BLEU.

    python bench/plain_loop.py --src e --tgt k --minutes 28 [--embed 256 --hidden 512]

The model is the textbook LSTM encoder-decoder of the default sizes (conf/model/small.yaml): a
one-direction encoder reading the source reversed, whose final state starts the decoder; Adam at 1e-3,
label smoothing 0.1, dropout 0.2, no schedule, no validation. It reads the same data as
``python train.py data.corpus.src_version=... data.corpus.tgt_version=...`` (the package's corpus
reader and prepared cache: the same sentencepiece model and training ids), batches pairs of similar
length up to 3,000 target tokens, and scores every test pair (sources truncated to 128 subwords) with
sacrebleu against the raw references. bench/side_by_side.sh runs it next to train.py.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import sacrebleu
import torch
from torch import Tensor, nn

from seq2seq.data.corpora import load_bible
from seq2seq.data.prepared.cache import build_or_reuse
from seq2seq.data.prepared.format import open_prepared
from seq2seq.tokenization import BOS_ID, EOS_ID, PAD_ID, SubwordSettings


class Seq2Seq(nn.Module):
    def __init__(self, src_vocab: int, tgt_vocab: int, embed: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.src_embed = nn.Embedding(src_vocab, embed, padding_idx=PAD_ID)
        self.tgt_embed = nn.Embedding(tgt_vocab, embed, padding_idx=PAD_ID)
        self.encoder = nn.LSTM(embed, hidden, batch_first=True)
        self.decoder = nn.LSTM(embed, hidden, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, tgt_vocab)

    def encode(self, src: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """src: (B, S) reversed sources, padded at the end; returns the final (h, c), each (1, B, H)."""
        packed = nn.utils.rnn.pack_padded_sequence(
            self.dropout(self.src_embed(src)), lengths, batch_first=True, enforce_sorted=False
        )
        return self.encoder(packed)[1]

    def decode(self, tgt_in: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """tgt_in: (B, T) -> logits (B, T, V) and the new state."""
        outputs, state = self.decoder(self.dropout(self.tgt_embed(tgt_in)), state)
        return self.out(self.dropout(outputs)), state


def pad(rows: list[list[int]]) -> Tensor:
    out = torch.full((len(rows), max(map(len, rows))), PAD_ID, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def sources(rows: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Reversed, padded sources (B, S) and their lengths (B,)."""
    return pad([row[::-1] for row in rows]), torch.tensor([len(row) for row in rows])


def batches(src: list[list[int]], tgt: list[list[int]], budget: int, rng: random.Random) -> list[list[int]]:
    """Pairs sorted by length (ties at random), cut into batches of at most ``budget`` padded tokens,
    in shuffled order."""
    order = sorted(range(len(src)), key=lambda i: (len(src[i]), len(tgt[i]), rng.random()))
    out, batch, longest = [], [], 0
    for i in order:
        longest_with = max(longest, len(src[i]), len(tgt[i]) + 1)
        if batch and (len(batch) + 1) * longest_with > budget:
            out.append(batch)
            batch, longest_with = [], max(len(src[i]), len(tgt[i]) + 1)
        batch.append(i)
        longest = longest_with
    out.append(batch)
    rng.shuffle(out)
    return out


@torch.no_grad()
def greedy(model: Seq2Seq, rows: list[list[int]], batch_size: int = 100) -> list[list[int]]:
    model.eval()
    results: list[list[int]] = [[] for _ in rows]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        src, lengths = sources([rows[i] for i in chunk])
        state = model.encode(src, lengths)
        token = torch.full((len(chunk), 1), BOS_ID, dtype=torch.long)
        done = torch.zeros(len(chunk), dtype=torch.bool)
        outputs = []
        for _ in range(int(lengths.max()) * 2 + 10):
            logits, state = model.decode(token, state)
            token = logits[:, -1].argmax(dim=-1, keepdim=True)
            outputs.append(token.squeeze(1))
            done |= token.squeeze(1) == EOS_ID
            if done.all():
                break
        for row, ids in zip(chunk, torch.stack(outputs, dim=1).tolist(), strict=True):
            results[row] = ids[: ids.index(EOS_ID)] if EOS_ID in ids else ids
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--src", default="e", help="source Bible version (data.corpus.src_version)")
    parser.add_argument("--tgt", default="k", help="target Bible version (data.corpus.tgt_version)")
    parser.add_argument("--minutes", type=float, default=28.0, help="training time")
    parser.add_argument("--embed", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch-tokens", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--cache-dir", default=os.environ.get("SEQ2SEQ_CACHE_DIR", ".cache"))
    parser.add_argument("--result", help="write the scores here as JSON")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    corpus = load_bible(
        args.src, args.tgt, valid_size=1000, test_size=1000, seed=1234
    )  # conf/data/bible.yaml
    prepared = open_prepared(build_or_reuse(corpus, SubwordSettings(), max_len=128, cache_dir=args.cache_dir))
    tokenizer = prepared.tokenizer
    train_src, train_tgt = ([ids[i] for i in range(len(ids))] for ids in prepared.ids["train"])
    model = Seq2Seq(tokenizer.src_vocab_size, tokenizer.tgt_vocab_size, args.embed, args.hidden, dropout=0.2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss(ignore_index=PAD_ID, label_smoothing=0.1)

    started = time.perf_counter()
    deadline = started + args.minutes * 60
    steps = tokens = 0
    while time.perf_counter() < deadline:
        for batch in batches(train_src, train_tgt, args.batch_tokens, rng):
            if time.perf_counter() >= deadline:
                break
            model.train()
            src, lengths = sources([train_src[i] for i in batch])
            tgt_in = pad([[BOS_ID, *train_tgt[i]] for i in batch])
            tgt_out = pad([[*train_tgt[i], EOS_ID] for i in batch])
            logits, _ = model.decode(tgt_in, model.encode(src, lengths))
            loss = loss_fn(logits.flatten(0, 1), tgt_out.flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps, tokens = steps + 1, tokens + int((tgt_out != PAD_ID).sum())
    seconds = time.perf_counter() - started

    test_src = [ids[:128] for ids in tokenizer.encode_src(corpus.test.src)]
    hypotheses = tokenizer.decode_tgt(greedy(model, test_src))
    bleu = sacrebleu.corpus_bleu(hypotheses, [corpus.test.tgt])
    rate = tokens / seconds
    result = {
        "test_bleu_greedy": bleu.score,
        "steps": steps,
        "train_seconds": seconds,
        "tokens_per_second": rate,
    }
    print(
        f"plain loop: {steps} steps in {seconds / 60:.1f} min, {rate:,.0f} target tokens/s;"
        f" greedy test {bleu}"
    )
    if args.result:
        with open(args.result, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
