#!/usr/bin/env bash
# The GPU check: one call of at most 9 minutes on a cold CUDA machine with
# no network, compilation included. Parts, time plan and outputs: bench/gpu_check.py
# (`bash bench/gpu_check.sh --plan` prints the plan on any machine).
#
#   COMMIT=$(git rev-parse HEAD) bash bench/gpu_check.sh [output-dir]   # default: $OUT, else bench/results
#
# Device call: timeout_s=540 (9 minutes); the check ends by GPU_CHECK_BUDGET (default 500 s).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The compiled kernels, never the Triton interpreter or a forced backend.
unset TRITON_INTERPRET CONVGRU_TRITON_BACKEND
exec python3 -m bench.gpu_check "$@"
