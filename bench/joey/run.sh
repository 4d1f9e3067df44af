#!/usr/bin/env bash
# Joey NMT 2.3 side by side with our runs: same Bible split, same sentencepiece model, same budget.
#   bash bench/joey/run.sh WORK_DIR BUDGET_MINUTES [BEAM ...]     (beams to test with; default 1)
# Joey goes in its own environment (its pins differ from ours), sharing our torch:
#   python -m venv --system-site-packages /tmp/joeyenv
#   /tmp/joeyenv/bin/pip install joeynmt==2.3.0 importlib-metadata
# JOEY_PYTHON (default /tmp/joeyenv/bin/python) runs Joey.
set -euo pipefail
work=$1 budget=$2
shift 2
here=$(cd "$(dirname "$0")" && pwd)
joey_python=${JOEY_PYTHON:-/tmp/joeyenv/bin/python}

python "$here/prepare.py" "$work"
cp "$here/bible_rnn.yaml" "$work/config.yaml"
(cd "$work" && "$joey_python" "$here/joey.py" --budget-minutes "$budget" train config.yaml --skip-test 2>&1 |
  tee train.out)
for beam in "${@:-1}"; do
  bash "$here/translate.sh" "$work" "$beam"
done
