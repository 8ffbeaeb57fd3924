#!/usr/bin/env bash
# Everything a lent GPU should run for the foundation: the gpu-marked tests, then the fused_linear_logprob timings.
# Usage (repository root, posttrain installed): benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
out=${1:-bench-out}
mkdir -p "$out"
nvidia-smi | tee "$out/nvidia_smi.txt"
pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
python -m benchmarks.gpu_check 2>&1 | tee "$out/fused_linear_logprob.txt"
exit "$tests_rc"
