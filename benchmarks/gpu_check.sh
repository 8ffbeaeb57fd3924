#!/usr/bin/env bash
# What a lent GPU should run, in one call: the gpu-marked tests, fused_linear_logprob forward+backward in bf16 at the
# two reference shapes (posttrain vs the torch reference, TRL's fused head and Liger), then the whole op sweep.
# Usage (repository root, posttrain installed): benchmarks/gpu_check.sh [OUT_DIR] [--trainers]
set -uo pipefail
out=${1:-bench-out}
shift || true
mkdir -p "$out"
nvidia-smi > "$out/nvidia_smi.txt" 2>&1
pytest -m gpu -q -p no:cacheprovider 2>&1 | tail -n 40 | tee "$out/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
python -m benchmarks --op fused_linear_logprob --mode full --dtype bf16 \
  --shape N=16384,H=4096,V=151936 N=8192,H=896,V=151936 --out "$out/check" > "$out/check.log" 2>&1
sed -n '/## fused_linear_logprob — full/,$p' "$out/check/report.md"
python -m benchmarks --out "$out/suite" "$@" > "$out/suite.log" 2>&1
tail -n 5 "$out/suite.log"
exit "$tests_rc"
