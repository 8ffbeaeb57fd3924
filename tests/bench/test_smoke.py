"""`python -m benchmarks --smoke` must keep working: it runs every op's CPU-capable providers and writes every file.

Run as the user runs it (a subprocess from the repository root), which also keeps benchmarks/ off the test's path.
Of the three fused_linear_divergence entries (the same code with another beta) only the JSD runs here, to keep CI
short; test_units.py runs all three providers of each in process.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OPS = ("fused_linear_logprob", "selective_log_softmax", "dpo_loss", "grpo_advantages", "grpo_loss")
LOSS_OPS = ("fused_linear_loss_sft", "fused_linear_loss_grpo")
DIVERGENCE_OP = "fused_linear_divergence_jsd"
pytestmark = pytest.mark.skipif(not (ROOT / "benchmarks").is_dir(), reason="needs a posttrain checkout")


def _bench(*args):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "benchmarks", *args]
    return subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True)


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_smoke_run_writes_every_output(tmp_path):
    ops = (*OPS, *LOSS_OPS, DIVERGENCE_OP)
    result = _bench("--smoke", "--mode", "forward", "full", "--op", *ops, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = _csv(tmp_path / "results.csv")
    for op in ops:
        for provider in ("posttrain", "torch") + ("trl",) * (op == DIVERGENCE_OP):
            mine = [r for r in rows if r["op"] == op and r["provider"] == provider]
            modes = {"forward"} if op == "grpo_advantages" else {"full"} if op in LOSS_OPS else {"forward", "full"}
            assert {r["mode"] for r in mine} >= modes, (op, provider)
            assert all(r["error"] == "" and float(r["ms_p50"]) > 0 and int(r["samples"]) >= 5 for r in mine), mine
    assert {r["provider"] for r in rows if r["op"] in LOSS_OPS} >= {"posttrain", "posttrain_logprob", "torch", "trl"}
    assert all(r["commit"] and r["torch"] and r["triton"] for r in rows)
    streamed = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len([r for r in streamed if r["kind"] == "op"]) == len(rows)
    summary = json.loads((tmp_path / "summary.json").read_text())
    (entry,) = summary["fused_linear_logprob"]
    assert entry["ms"] > 0 and entry["torch_ms"] > 0 and entry["gemm_floor_ms"] > 0
    assert {e["loss"] for e in summary["fused_linear_loss"]} == {"sft", "grpo"}
    assert all(e["ms"] > 0 and e["trl_ms"] > 0 and e["gemm_floor_ms"] > 0 for e in summary["fused_linear_loss"])
    (divergence,) = summary["fused_linear_divergence"]
    assert divergence["divergence"] == "jsd" and (divergence["N"], divergence["Hs"], divergence["Ht"]) == (37, 32, 48)
    assert divergence["ms"] > 0 and divergence["trl_ms"] > 0 and divergence["gemm_floor_ms"] > 0
    report = (tmp_path / "report.md").read_text()
    assert all(f"## {op}" in report for op in ops)
    assert f"- {DIVERGENCE_OP}: liger: dropped, does not run on cpu" in report
    assert "- fused_linear_logprob: torch_compile: dropped, does not run on cpu" in report  # notes reach the report
    assert (tmp_path / "report.png").stat().st_size > 0


def test_shape_override_provider_filter_and_bad_shape(tmp_path):
    result = _bench("--smoke", "--op", "selective_log_softmax", "--mode", "forward", "--shape", "N=3,V=77",
                    "--provider", "torch", "--out", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = _csv(tmp_path / "results.csv")
    assert {(r["shape"], r["provider"]) for r in rows} == {("N=3,V=77", "torch")}
    bad = _bench("--smoke", "--shape", "N=3;V=7")
    assert bad.returncode == 2 and "is not of the form" in bad.stderr


@pytest.mark.slow  # the first run's smoke test (tests/bench/test_first.py) covers the trainer rows in CI
def test_trainer_rows_in_smoke_mode(tmp_path):
    result = _bench("--smoke", "--op", "dpo_loss", "--mode", "forward", "--trainers", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "summary.json").read_text())["trainers"]
    assert [r["trainer"] for r in rows] == ["sft", "dpo", "grpo", "kto", "reward"]
    for row in rows:
        assert row["tokens_per_s"] > 0 and row["trl_tokens_per_s"] > 0, row
    assert "## Trainer steps" in (tmp_path / "report.md").read_text()
