#!/usr/bin/env bash
# Issue 8: the model variants trained for the same wall-clock budget on the Bible (German -> English),
# then Joey NMT's RNN for the same budget, then checkpoint averaging, a 2-model ensemble, BLEU by
# source length and the results table. Everything runs one after another: on a 2-core machine a second
# job running beside a timed run would slow it down.
#   bash bench/quality.sh [OUT_DIR] [BUDGET_MINUTES]      (defaults: outputs/quality, 15)
set -euo pipefail
out=${1:-outputs/quality} budget=${2:-15}
runs=$out/runs
variants=ctx_plain,ctx_reversed,ctx_bidirectional,attn_bahdanau,attn_luong

# 1. Our variants, in one Hydra multirun. Validation every 100 batches so the best checkpoint is never
#    far from the end of the budget; callbacks=averaging keeps the weights every 50 steps.
python train.py -m experiment=$variants callbacks=averaging \
  trainer.max_time="00:00:$(printf %02d "$budget"):00" trainer.val_check_interval=100 \
  hydra.sweep.dir="$runs" 'hydra.sweep.subdir=${hydra:runtime.choices.experiment}'

# 2. Joey NMT 2.3 for the same budget (greedy on the test split).
bash bench/joey/run.sh "$out/joey" "$budget" 1

# 3. Each attention run greedy too (Joey's decoding above), and checkpoint averaging: the last 4
#    periodic checkpoints (the last 150 steps) of each.
best() { ls "$runs/$1/checkpoints/"best-*.ckpt; }
for run in attn_bahdanau attn_luong; do
  python translate.py ckpt="$(best $run)" input="$runs/$run/test.src" beam=1 \
    output="$runs/$run/greedy.test.hyp" ref="$runs/$run/test.ref" progress=false
  python -m seq2seq.averaging --output "$runs/$run/averaged.ckpt" \
    $(ls "$runs/$run/checkpoints/periodic/"*.ckpt | tail -n 4)
  python translate.py ckpt="$runs/$run/averaged.ckpt" input="$runs/$run/test.src" \
    output="$runs/$run/averaged.test.hyp" ref="$runs/$run/test.ref" progress=false
done

# 4. A 2-model ensemble: the best checkpoints of the two attention runs.
python translate.py "ckpt=[$(best attn_bahdanau),$(best attn_luong)]" input="$runs/attn_bahdanau/test.src" \
  output="$out/ensemble.test.hyp" ref="$runs/attn_bahdanau/test.ref" progress=false

# 5. BLEU by source length, and the table.
python -m seq2seq.length_buckets --src "$runs/ctx_plain/test.src" --ref "$runs/ctx_plain/test.ref" \
  --hyp "context vector=$runs/ctx_plain/test.hyp" --hyp "bidirectional=$runs/ctx_bidirectional/test.hyp" \
  --hyp "Bahdanau attention=$runs/attn_bahdanau/test.hyp" --hyp "Luong attention=$runs/attn_luong/test.hyp" \
  --hyp "Joey NMT (greedy)=$out/joey/test.beam1.hyp" --out "$out"
python bench/quality_table.py "$out"
