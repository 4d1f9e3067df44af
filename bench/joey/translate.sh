#!/usr/bin/env bash
# Translate and score the test split with the Joey model that bench/joey/run.sh trained in WORK_DIR.
#   bash bench/joey/translate.sh WORK_DIR BEAM      -> WORK_DIR/test.beamBEAM.hyp, timing and scores
# It decodes the weights saved when the budget ran out (model/latest.ckpt): inside the first epoch
# those are Joey's best, and they are what the budget bought.
set -euo pipefail
work=$1 beam=$2
here=$(cd "$(dirname "$0")" && pwd)
joey_python=${JOEY_PYTHON:-/tmp/joeyenv/bin/python}
cd "$work"
sed "s/beam_size: 5/beam_size: $beam/; s#^testing:#testing:\n    load_model: \"model/latest.ckpt\"#" \
  config.yaml > "test.beam$beam.yaml"
# Joey 2.3's `translate -o FILE` fails (args.n_best); its stdout carries only the translations.
start=$(date +%s.%N)
"$joey_python" "$here/joey.py" translate "test.beam$beam.yaml" < data/test.de > "test.beam$beam.hyp" \
  2> "test.beam$beam.log"
seconds=$(echo "$(date +%s.%N) - $start" | bc)
echo "beam $beam: $(wc -l < "test.beam$beam.hyp") lines translated in $seconds s (model loading included)"
sacrebleu data/test.en -i "test.beam$beam.hyp" -m bleu chrf -f text -w 2
