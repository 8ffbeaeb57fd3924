#!/usr/bin/env bash
# What a lent GPU runs, in one device call (repository root, posttrain installed; see benchmarks/NOTES.md's runbook):
#
#   benchmarks/gpu_check.sh OUT first [--smoke]   the first GPU run, phase by phase, each under its own deadline
#   benchmarks/gpu_check.sh OUT memory [ARGS]     the longest-sequence table alone (python -m benchmarks.memory ARGS:
#                                                 --smoke, --trainer, --variant), for a dedicated call
#   benchmarks/gpu_check.sh OUT generation [ARGS] the sampling backends' tokens/s alone (python -m
#                                                 benchmarks.generation ARGS: --smoke, --provider), for a dedicated call
#   benchmarks/gpu_check.sh OUT ops               the whole op sweep (python -m benchmarks), for a follow-up call
#
# first: (a) tests     a chosen subset of the gpu-marked tests (the bf16 kernel cases), capped at 170 s
#        (b) verify    posttrain and torch at bf16 against an fp32 reference at the two headline shapes
#        (c) headline  ceilings, GEMM floors, fused_linear_logprob and the fused linear loss rows against TRL's head,
#                      Liger, torch and torch.compile at the two headline shapes
#        (d) tiles     each candidate tile of the LM-head kernels pinned and timed in turn (POSTTRAIN_AUTOTUNE=1 gives
#                      the candidates: benchmarks/tiles.py)
#        (e) trainers  SFT / DPO / GRPO / KTO / Reward steps against TRL: tokens/s, peak memory
#        (f) memory    if time is left: the longest sequence that trains one step, per trainer and variant, most
#                      wanted first (benchmarks/memory.py), until the deadline
#        (g) generation  only if the memory phase ends before the deadline (it does not take time from the phases
#                      before it): the sampling backends' generated tokens/s (benchmarks/generation.py)
#        then report.md, summary.json, results.csv and report.png from OUT/first.jsonl, where every phase appends
#        each row as it is measured. A phase ends at min(its cap, the global deadline less what the later phases
#        are guaranteed): a slow phase cannot eat the others' time. FIRST_BUDGET_S (default 540) is the whole
#        script's wall time. Output files (8): nvidia_smi.txt tests.log run.log first.jsonl report.md summary.json
#        results.csv report.png.
# --smoke: the same script on the CPU (tiny fp32 shapes, Triton's interpreter; the gpu tests are collected and skipped).
# memory, generation: FIRST_BUDGET_S is their wall time too; files (6): nvidia_smi.txt run.log memory.jsonl (or
#        generation.jsonl) report.md summary.json results.csv.
set -uo pipefail
usage="usage: benchmarks/gpu_check.sh OUT_DIR {first [--smoke] | memory [--smoke] [--trainer ...] [--variant ...] |
  generation [--smoke] [--provider ...] | ops}"
[[ $# -ge 1 ]] || { echo "$usage" >&2; exit 2; }
mkdir -p "$1" && out=$(cd "$1" && pwd)
what=${2:-first}
shift $(($# < 2 ? $# : 2))
extra=("$@")
smoke=${1:-}
cd "$(dirname "$0")/.." || exit 2
python=${PYTHON:-python3}
start=$(date +%s)
end=$((start + ${FIRST_BUDGET_S:-540}))
jsonl=$out/first.jsonl
log=$out/run.log

if ! "$python" -c "import posttrain.kernels" 2>/dev/null; then
  # the editable install failed (e.g. the image's setuptools): run from the tree, kernels/ linked as posttrain.kernels
  echo "posttrain is not installed: running from the tree" | tee -a "$log"
  [[ -e posttrain/kernels ]] || ln -s ../kernels posttrain/kernels
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

phase_row() {  # NAME STATUS RC SECONDS
  [[ -s $jsonl && -n $(tail -c 1 "$jsonl") ]] && echo >> "$jsonl"  # a killed phase's last line, cut short
  printf '{"kind": "phase", "phase": "%s", "status": "%s", "rc": %s, "seconds": %s}\n' "$@" >> "$jsonl"
}

# run_phase NAME CAP_S RESERVE_S LOGFILE CMD...: CMD runs until min(now + CAP_S, end - RESERVE_S); it is told its
# deadline (5 s earlier) in BENCH_DEADLINE, then killed by `timeout` at it.
run_phase() {
  local name=$1 cap=$2 reserve=$3 phase_log=$4 now stop rc status
  shift 4
  now=$(date +%s)
  stop=$((now + cap))
  ((stop > end - reserve)) && stop=$((end - reserve))
  if ((stop - now < 10)); then
    phase_row "$name" skipped 0 0
    echo "[$name] skipped: $((stop - now)) s left for it"
    return
  fi
  echo "== $name (+$((now - start)) s, until +$((stop - start)) s)" >> "$log"
  BENCH_DEADLINE=$((stop - 5)) timeout -k 10 $((stop - now)) "$@" >> "$phase_log" 2>&1
  rc=$?
  case $rc in
    0) status=done ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  phase_row "$name" "$status" "$rc" "$(($(date +%s) - now))"
  echo "[$name] $status (rc $rc) after $(($(date +%s) - now)) s"
}

# the bf16 kernel cases and the memory bound, cheaply; the fused linear loss's gpu tests when that op exists
test_files=(tests/ops/test_fused_linear_logprob.py tests/ops/test_selective_log_softmax.py tests/ops/test_dpo_loss.py
  tests/models/test_attention.py)
[[ -f tests/ops/test_fused_linear_loss.py ]] && test_files+=(tests/ops/test_fused_linear_loss.py)
workers=4
[[ $smoke == --smoke ]] && workers=0
gpu_tests=("$python" -m pytest -p no:cacheprovider -q -rfEs --durations=10 -n "$workers" -m gpu "${test_files[@]}"
  -k "bf16 or extra_memory or varlen or (bfloat16 and (sigmoid-reverse_kl or ipo-js))")

case $what in
  first)
    : > "$jsonl"
    : > "$log"
    : > "$out/tests.log"
    clocks=(nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv)
    { nvidia-smi && "${clocks[@]}"; } > "$out/nvidia_smi.txt" 2>&1
    first=("$python" -m benchmarks.first)
    [[ $smoke == --smoke ]] && first+=(--smoke)
    # reserves: what the later phases are guaranteed (verify 30 s, headline 120, tiles 40, trainers 40, report 20)
    run_phase tests 170 250 "$out/tests.log" "${gpu_tests[@]}"
    tail -n 1 "$out/tests.log"
    run_phase verify 60 220 "$log" "${first[@]}" verify --out "$out"
    run_phase headline 200 100 "$log" "${first[@]}" headline --out "$out"
    POSTTRAIN_AUTOTUNE=1 run_phase tiles 60 60 "$log" "${first[@]}" tiles --out "$out"
    run_phase trainers 100000 20 "$log" "${first[@]}" trainers --out "$out"
    run_phase memory 100000 20 "$log" "${first[@]}" memory --out "$out"
    run_phase generation 100000 20 "$log" "${first[@]}" generation --out "$out"
    "${clocks[@]}" >> "$out/nvidia_smi.txt" 2>&1  # the clocks again, after the load
    timeout -k 5 60 "${first[@]}" report --out "$out" 2>> "$log"
    echo "# $(($(date +%s) - start)) s in all; files under $out: $(cd "$out" && ls | tr '\n' ' ')"
    ;;
  memory | generation)
    : > "$log"
    clocks=(nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv)
    { nvidia-smi && "${clocks[@]}"; } > "$out/nvidia_smi.txt" 2>&1
    # no new probe or run starts 15 s before the end, so the report is written in time
    BENCH_DEADLINE=$((end - 15)) timeout -k 5 $((end - start)) "$python" -m "benchmarks.$what" --out "$out" \
      ${extra[@]+"${extra[@]}"} >> "$log" 2>&1
    rc=$?
    cat "$out/report.md"
    echo "# $(($(date +%s) - start)) s in all (rc $rc); files under $out: $(cd "$out" && ls | tr '\n' ' ')"
    exit $rc
    ;;
  ops)
    "$python" -m benchmarks --out "$out" > "$log" 2>&1
    rc=$?
    cat "$out/report.md"
    exit $rc
    ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
