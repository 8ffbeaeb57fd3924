#!/usr/bin/env bash
# What a lent GPU should run, phase by phase (each fits one 10-minute device call):
#   tests     the kernel-side tests (tests/ops, kernels, models, csrc: their tensors go to the GPU when there is one,
#             see tests/conftest.py) and every other gpu-marked test
#   check     fused_linear_logprob forward+backward in bf16 at the two reference shapes, against the torch
#             reference, TRL's fused head and Liger's fused linear cross entropy
#   ops       the whole op sweep (python -m benchmarks)
#   trainers  the SFT / DPO / GRPO step rows against TRL, with the longest DPO / GRPO sequence that fits
# Usage (repository root, posttrain installed): benchmarks/gpu_check.sh OUT_DIR [PHASE ...]   (default: tests check)
set -uo pipefail
out=${1:-bench-out}
shift || true
phases=${*:-tests check}
mkdir -p "$out"
nvidia-smi > "$out/nvidia_smi.txt" 2>&1
rc=0
for phase in $phases; do
  case $phase in
    tests)
      kernel_dirs="tests/ops tests/kernels tests/models tests/csrc"
      # shellcheck disable=SC2086
      pytest $kernel_dirs -q -p no:cacheprovider > "$out/gpu_tests.log" 2>&1 || rc=1
      # shellcheck disable=SC2046,SC2086
      pytest -m gpu -q -p no:cacheprovider $(printf -- '--ignore=%s ' $kernel_dirs) >> "$out/gpu_tests.log" 2>&1 || rc=1
      grep -E "passed|failed|error" "$out/gpu_tests.log" | tail -n 4 ;;
    check)
      python -m benchmarks --op fused_linear_logprob --mode full --dtype bf16 \
        --shape N=16384,H=4096,V=151936 N=8192,H=896,V=151936 --out "$out/check" > "$out/check.log" 2>&1 || rc=1
      sed -n '/## fused_linear_logprob — full/,$p' "$out/check/report.md" ;;
    ops)
      python -m benchmarks --out "$out/ops" > "$out/ops.log" 2>&1 || rc=1
      tail -n 3 "$out/ops.log" ;;
    trainers)
      python -m benchmarks --op dpo_loss --mode forward --shape B=64 --trainers --out "$out/trainers" \
        > "$out/trainers.log" 2>&1 || rc=1
      grep "\[trainers\]" "$out/trainers.log" ;;
    *) echo "unknown phase: $phase (tests, check, ops, trainers)" >&2; rc=2 ;;
  esac
done
exit $rc
