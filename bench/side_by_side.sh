#!/usr/bin/env bash
# The yardstick (issue 24): `python train.py` and the plain PyTorch loop (bench/plain_loop.py) trained
# side by side on one core each (taskset -c 0 / -c 1, one thread each) for the same minutes on one Bible
# pair, then both greedy test BLEU scores and their ratio. Nothing else should run on the machine.
#   bash bench/side_by_side.sh SRC TGT MINUTES [train.py overrides...]
#   e.g. bash bench/side_by_side.sh e k 28          (German -> English, the default pair)
#        bash bench/side_by_side.sh 9 4 28          (Spanish -> English)
# Environment: OUT (default outputs/side_by_side/SRC-TGT-MINUTES), PLAIN_ARGS (extra plain_loop.py
# options, e.g. "--embed 32 --hidden 64" for a quick check with train.py's model=tiny).
set -euo pipefail
src=$1 tgt=$2 minutes=$3
shift 3
out=${OUT:-outputs/side_by_side/$src-$tgt-$minutes}
mkdir -p "$out"
seconds=$(python -c "print(round($minutes * 60))")
max_time=$(printf "%02d:%02d:%02d:%02d" $((seconds / 86400)) $((seconds % 86400 / 3600)) \
  $((seconds % 3600 / 60)) $((seconds % 60)))
pair=(data.corpus.src_version="$src" data.corpus.tgt_version="$tgt")

# The prepared data (sentencepiece and ids) first, so that neither timed run waits on the other's build.
python -m seq2seq.prepare "${pair[@]}" > /dev/null

export OMP_NUM_THREADS=1
# shellcheck disable=SC2086  # PLAIN_ARGS is a list of options
taskset -c 0 python bench/plain_loop.py --src "$src" --tgt "$tgt" --minutes "$minutes" \
  --result "$out/plain.json" $PLAIN_ARGS > "$out/plain.log" 2>&1 &
plain=$!
taskset -c 1 python train.py "${pair[@]}" trainer.max_time="$max_time" decoding.beam=1 \
  trainer.enable_progress_bar=false hydra.run.dir="$out/train" "$@" > "$out/train.log" 2>&1 &
ours=$!
status=0
wait $plain || { echo "plain loop failed: see $out/plain.log" >&2; status=1; }
wait $ours || { echo "train.py failed: see $out/train.log" >&2; status=1; }
[ $status = 0 ] || exit $status

python - "$out" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
plain = json.loads((out / "plain.json").read_text())
ours = json.loads((out / "train" / "result.json").read_text())
print(f"train.py:   greedy test BLEU {ours['test_bleu']:.2f}, {ours['steps']} steps,"
      f" {ours['tokens_per_second']:,.0f} target tokens/s")
print(f"plain loop: greedy test BLEU {plain['test_bleu_greedy']:.2f}, {plain['steps']} steps,"
      f" {plain['tokens_per_second']:,.0f} target tokens/s")
print(f"ratio (train.py / plain loop): {ours['test_bleu'] / max(plain['test_bleu_greedy'], 1e-9):.2f}")
EOF
