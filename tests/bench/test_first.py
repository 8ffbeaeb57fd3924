"""benchmarks/gpu_check.sh OUT first --smoke: the first GPU run's script, end to end on the CPU, as the device call runs
it (the same phases and files, tiny fp32 shapes in Triton's interpreter, the gpu tests collected and skipped)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FILES = {"nvidia_smi.txt", "tests.log", "run.log", "first.jsonl", "report.md", "summary.json", "results.csv",
         "report.png"}  # fmt: skip
PHASES = ["tests", "verify", "headline", "tiles", "trainers", "memory", "generation"]
pytestmark = pytest.mark.skipif(not (ROOT / "benchmarks").is_dir(), reason="needs a posttrain checkout")


def _first(out: Path, budget_s: int | None = None):
    env = {**os.environ, "PYTHON": sys.executable, "TRITON_INTERPRET": "1"}
    if budget_s is not None:
        env["FIRST_BUDGET_S"] = str(budget_s)
    command = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "first", "--smoke"]
    return subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "first.jsonl").read_text().splitlines()]


def test_first_run_smoke_end_to_end(tmp_path):
    result = _first(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert {p.name for p in tmp_path.iterdir()} == FILES  # at most 8 files come back from a device call
    rows = _rows(tmp_path)
    phases = [r for r in rows if r["kind"] == "phase"]
    assert [(r["phase"], r["status"]) for r in phases] == [(name, "done") for name in PHASES], phases
    assert "skipped" in (tmp_path / "tests.log").read_text()  # the selected gpu tests exist and were collected
    verify = [r for r in rows if r["kind"] == "verify"]
    assert {(r["op"], r["impl"]) for r in verify} >= {("fused_linear_logprob", impl) for impl in ("posttrain", "torch")}
    for row in verify:  # fp32 against fp64 in smoke mode
        assert "error" not in row and row["logprobs_max"] < 1e-4 and row["d_weight_rel"] < 1e-4, row
    ops = [r for r in rows if r["kind"] == "op"]
    assert {(r["op"], r["provider"]) for r in ops} >= {
        ("fused_linear_logprob", "posttrain"), ("fused_linear_logprob", "trl"), ("fused_linear_logprob", "torch"),
        ("fused_linear_loss_sft", "trl"), ("fused_linear_loss_grpo", "trl")}  # fmt: skip
    assert all(r["samples"] >= 5 for r in ops if "error" not in r)
    assert {r["phase"] for r in rows if r["kind"] == "floor"} == {"headline"}
    assert any(r["kind"] == "note" and r["phase"] == "tiles" for r in rows)  # the interpreter has one tile
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["fused_linear_logprob"][0]["trl_ms"] > 0 and summary["verify"]
    assert [r["trainer"] for r in summary["trainers"]] == ["sft", "dpo", "grpo", "kto", "reward"]
    assert all(r["tokens_per_s"] > 0 and r["trl_tokens_per_s"] > 0 for r in summary["trainers"]), summary["trainers"]
    dpo = summary["trainers"][1]  # the memory phase's smoke search: DPO with TRL and posttrain, lengths 16 to 32
    assert dpo["tokens_per_s"] > 0 and dpo["max_seq_len"] == dpo["trl_max_seq_len"] == 32
    assert [(r["variant"], r["status"]) for r in summary["max_seq"]] == [("trl", "at the limit"),
                                                                         ("posttrain", "at the limit")]  # fmt: skip
    # the memory phase's smoke search ends early, which leaves the generation phase its time
    assert [r["provider"] for r in summary["generation"]] == ["transformers", "transformers_logprobs",
                                                              "continuous_batching"]  # fmt: skip
    assert all(r["tokens_per_s"] > 0 and r["runs"] == 3 for r in summary["generation"]), summary["generation"]
    report = (tmp_path / "report.md").read_text()
    sections = ("Notes", "Phases", "GPU tests", "Verify", "fused_linear_logprob", "Trainer", "Longest sequence",
                "Generation")  # fmt: skip
    for section in (f"## {name}" for name in sections):
        assert section in report
    assert "## Phases" in result.stdout  # the report is printed: it ends up in the device call's output


def test_phases_without_time_are_skipped_and_the_report_still_written(tmp_path):
    result = _first(tmp_path, budget_s=25)  # less than every phase's guaranteed reserve
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    phases = [(r["phase"], r["status"]) for r in _rows(tmp_path) if r["kind"] == "phase"]
    assert phases == [(name, "skipped") for name in PHASES]
    assert "| trainers | skipped |" in (tmp_path / "report.md").read_text()
