#!/usr/bin/env bash
# The one-shot GPU session (benchmarks/gpu_session.py) from a clone, with nothing installed:
#   bash benchmarks/gpu_session.sh [--redo] [other options of gpu_session.py]
# Results go to $OUT when it is set (the device tool's folder that comes back), else to
# benchmarks/results/. python3 is the interpreter that holds torch and triton.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" benchmarks/gpu_session.py "$@"
