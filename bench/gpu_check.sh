#!/usr/bin/env bash
# One table that says whether a GPU machine trains and decodes as it should (bench/gpu_check.py says
# what each row is). Stopped after 10 minutes, the rows measured so far printed:
#   bench/gpu_check.sh                 # the first GPU
#   bench/gpu_check.sh --device cpu    # the same checks at tiny sizes on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 600 python bench/gpu_check.py "$@"
