#!/usr/bin/env bash
# The GPU check: one call on a CUDA machine with no network (torch, triton,
# pytest preinstalled). Runs the whole test suite with compiled Triton kernels
# on CUDA tensors, from the source tree (no install), and writes a short report.
#
#   COMMIT=$(git rev-parse HEAD) bash bench/gpu_check.sh [output-dir]
#
# Output (default bench/results/): gpu_check.md (GPU, versions, commit, test
# summary), gpu_tests.xml (JUnit) and gpu_tests.log. Budget: about 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir=${1:-${OUT:-bench/results}}
mkdir -p "$out_dir"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET CONVGRU_TRITON_BACKEND
commit=${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}

python3 - "$commit" > "$out_dir/gpu_env.txt" <<'PY'
import sys, torch, triton
assert torch.cuda.is_available(), "no CUDA device: this script is for the GPU machine"
print(f"gpu: {torch.cuda.get_device_name(0)}")
print(f"capability: {'.'.join(map(str, torch.cuda.get_device_capability(0)))}")
print(f"torch: {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})")
print(f"triton: {triton.__version__}")
print(f"python: {sys.version.split()[0]}")
print(f"commit: {sys.argv[1]}")
PY
env_status=$?
cat "$out_dir/gpu_env.txt"
[ $env_status -eq 0 ] || exit $env_status

start=$(date +%s)
timeout 420 python3 -m pytest tests -q -rfEs -p no:cacheprovider \
    --junitxml="$out_dir/gpu_tests.xml" 2>&1 | tee "$out_dir/gpu_tests.log"
test_status=${PIPESTATUS[0]}
elapsed=$(( $(date +%s) - start ))

{
    echo "# GPU check"
    echo
    sed 's/^/- /' "$out_dir/gpu_env.txt"
    echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "## Test suite (compiled kernels, CUDA tensors)"
    echo
    echo "Exit status $test_status after ${elapsed} s."
    echo
    echo '```'
    grep -E "passed|failed|error|skipped|^(FAILED|ERROR|SKIPPED)" "$out_dir/gpu_tests.log" | tail -n 40
    echo '```'
} > "$out_dir/gpu_check.md"
echo "report: $out_dir/gpu_check.md"
exit $test_status
