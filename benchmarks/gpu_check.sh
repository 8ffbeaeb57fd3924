#!/usr/bin/env bash
# What a lent GPU should run, in one call:
#   1. the kernel-side tests (tests/ops, kernels, models, csrc: their tensors go to the GPU when there is one, see
#      tests/ops/conftest.py) and every other gpu-marked test;
#   2. fused_linear_logprob forward+backward in bf16 at the two reference shapes, against the torch reference, TRL's
#      fused head and Liger's fused linear cross entropy;
#   3. the whole op sweep (pass --trainers for the trainer-step rows).
# Usage (repository root, posttrain installed): benchmarks/gpu_check.sh [OUT_DIR] [extra python -m benchmarks args]
set -uo pipefail
out=${1:-bench-out}
shift || true
mkdir -p "$out"
nvidia-smi > "$out/nvidia_smi.txt" 2>&1
kernel_dirs="tests/ops tests/kernels tests/models tests/csrc"
pytest $kernel_dirs -q -p no:cacheprovider > "$out/gpu_tests.log" 2>&1
kernel_rc=$?
# shellcheck disable=SC2086
pytest -m gpu -q -p no:cacheprovider $(printf -- '--ignore=%s ' $kernel_dirs) >> "$out/gpu_tests.log" 2>&1
gpu_rc=$?
grep -E "passed|failed|error" "$out/gpu_tests.log" | tail -n 4
python -m benchmarks --op fused_linear_logprob --mode full --dtype bf16 \
  --shape N=16384,H=4096,V=151936 N=8192,H=896,V=151936 --out "$out/check" > "$out/check.log" 2>&1
sed -n '/## fused_linear_logprob — full/,$p' "$out/check/report.md"
python -m benchmarks --out "$out/suite" "$@" > "$out/suite.log" 2>&1
tail -n 3 "$out/suite.log"
exit $((kernel_rc || gpu_rc))
