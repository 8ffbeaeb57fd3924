"""`python -m benchmarks --smoke` must keep working: it runs every op's CPU-capable providers and writes every file.

Run as the user runs it (a subprocess from the repository root), which also keeps benchmarks/ off the test's path.
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


def _bench(*args):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=ROOT, env=env, capture_output=True, text=True)


@pytest.mark.skipif(not (ROOT / "benchmarks").is_dir(), reason="needs a posttrain checkout")
def test_smoke_run_writes_every_output(tmp_path):
    result = _bench("--smoke", "--mode", "forward", "full", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    for op in OPS:
        for provider in ("posttrain", "torch"):
            mine = [r for r in rows if r["op"] == op and r["provider"] == provider]
            assert {r["mode"] for r in mine} >= ({"forward"} if op == "grpo_advantages" else {"forward", "full"}), (op, provider)
            assert all(r["error"] == "" and float(r["ms_p50"]) > 0 for r in mine), mine
    assert all(r["commit"] and r["torch"] and r["triton"] for r in rows)
    summary = json.loads((tmp_path / "summary.json").read_text())
    (entry,) = summary["fused_linear_logprob"]
    assert entry["ms"] > 0 and entry["torch_ms"] > 0 and entry["gemm_floor_ms"] > 0
    report = (tmp_path / "report.md").read_text()
    assert all(f"## {op}" in report for op in OPS)
    assert (tmp_path / "fused_linear_logprob.png").stat().st_size > 0


@pytest.mark.skipif(not (ROOT / "benchmarks").is_dir(), reason="needs a posttrain checkout")
def test_shape_override_and_bad_shape(tmp_path):
    result = _bench("--smoke", "--op", "selective_log_softmax", "--mode", "forward", "--shape", "N=3,V=77",
                    "--out", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert {r["shape"] for r in rows} == {"N=3,V=77"}
    bad = _bench("--smoke", "--shape", "N=3;V=7")
    assert bad.returncode == 2 and "is not of the form" in bad.stderr


@pytest.mark.skipif(not (ROOT / "benchmarks").is_dir(), reason="needs a posttrain checkout")
def test_trainer_rows_in_smoke_mode(tmp_path):
    result = _bench("--smoke", "--op", "dpo_loss", "--mode", "forward", "--trainers", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "summary.json").read_text())["trainers"]
    assert [r["trainer"] for r in rows] == ["sft", "dpo", "grpo"]
    for row in rows:
        assert row["tokens_per_s"] > 0 and row["trl_tokens_per_s"] > 0, row
    assert "## Trainer steps" in (tmp_path / "report.md").read_text()
