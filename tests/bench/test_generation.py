"""benchmarks/generation.py: the sampling backends' rows on the tiny model on the CPU (in process, through main), the
workload's layout, the deadline, the report's table and summary section, and `gpu_check.sh OUT generation --smoke` as
the device call runs it."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("benchmarks", reason="needs a posttrain checkout (tests/bench/conftest.py imports benchmarks/)")

ROOT = Path(__file__).resolve().parents[2]
CPU_PROVIDERS = ["transformers", "transformers_logprobs", "continuous_batching"]


def _quiet():
    from benchmarks.sink import Recorder

    return Recorder(log=lambda _: None)


def test_prompts_repeat_each_prompt_generations_times_in_a_row():
    from benchmarks.generation import WORKLOAD, Workload, prompt_ids

    ids = prompt_ids(Workload(prompts=3, generations=4, prompt_len=5, max_completion_length=8))
    assert len(ids) == 12 and all(len(p) == 5 and all(0 <= t < 256 for t in p) for p in ids)
    assert all(ids[4 * i + j] == ids[4 * i] for i in range(3) for j in range(4))
    assert len({tuple(p) for p in ids}) == 3  # distinct prompts
    assert (WORKLOAD.sequences, WORKLOAD.prompt_len, WORKLOAD.max_completion_length) == (64, 128, 512)


def test_smoke_rows_report_and_summary(tmp_path):
    from benchmarks.generation import RUNS, SMOKE_WORKLOAD, main
    from benchmarks.providers import importable

    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "generation.jsonl").read_text().splitlines()]
    measured = [r for r in rows if r["kind"] == "generation"]
    assert [r["provider"] for r in measured] == CPU_PROVIDERS
    most = SMOKE_WORKLOAD.sequences * SMOKE_WORKLOAD.max_completion_length
    for row in measured:
        assert "error" not in row and row["runs"] == RUNS == len(row["seconds"]) == len(row["generated_tokens"]), row
        assert all(0 < n <= most for n in row["generated_tokens"]) and all(s > 0 for s in row["seconds"])
        rates = [n / s for n, s in zip(row["generated_tokens"], row["seconds"])]
        assert row["tokens_per_s"] == pytest.approx(statistics.median(rates))
        assert row["reports_logprobs"] == (row["provider"] == "transformers_logprobs")
        assert row["peak_mb"] is None and row["phase"] == "generation"  # no CUDA allocator here
    notes = [r["text"] for r in rows if r["kind"] == "note"]
    if not importable("vllm"):
        assert notes == ["generation: vllm_colocate: dropped, vllm is not importable"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [e["provider"] for e in summary["generation"]] == CPU_PROVIDERS
    assert summary["generation"][0]["tokens_per_s"] == measured[0]["tokens_per_s"]
    report = (tmp_path / "report.md").read_text()
    assert "## Generation" in report and "2 prompts x 2 generations, 8-token prompts, at most 8 new tokens" in report
    assert "| transformers_logprobs |" in report


def test_a_passed_deadline_measures_nothing_and_says_so():
    from benchmarks.generation import run_generation

    recorder = _quiet()
    run_generation(recorder, smoke=True, deadline=1.0, providers=["transformers"])
    assert [r["kind"] for r in recorder.rows] == ["note"]
    assert recorder.rows[0]["text"] == "generation: deadline reached before transformers"


def test_no_run_starts_that_the_deadline_would_cut(monkeypatch):
    from benchmarks import generation

    clock = [0.0]

    def run(backend, model, prompts, generations):  # each run takes 30 s of a fake clock and makes 64 tokens
        clock[0] += 30.0
        return 30.0, 64

    monkeypatch.setattr(generation, "_backend", lambda *args: type("Backend", (), {"reports_logprobs": False})())
    monkeypatch.setattr(generation, "_timed_run", run)
    monkeypatch.setattr(generation, "past", lambda deadline, margin_s=0.0: clock[0] > deadline - margin_s)
    provider = generation.PROVIDERS[0]
    # warm-up ends at 30 s, the first timed run at 60 s; a second would end at 90 s, past the deadline
    row = generation.measure(provider, None, None, generation.SMOKE_WORKLOAD, "cpu", True, deadline=80.0)
    assert row["runs"] == 1 and row["seconds"] == [30.0] and row["tokens_per_s"] == pytest.approx(64 / 30)
    assert row["error"] == "cut by the deadline after 1 of 3 timed runs"
    clock[0] = 0.0
    row = generation.measure(provider, None, None, generation.SMOKE_WORKLOAD, "cpu", True, deadline=120.0)
    assert row["runs"] == 3 and "error" not in row


def test_a_failing_backend_gives_an_error_row(monkeypatch):
    from benchmarks import generation

    def broken(*args, **kwargs):
        raise RuntimeError("engine died")

    monkeypatch.setattr(generation, "_backend", broken)
    recorder = _quiet()
    generation.run_generation(recorder, smoke=True, providers=["continuous_batching"])
    (row,) = [r for r in recorder.rows if r["kind"] == "generation"]
    assert row["error"] == "RuntimeError: engine died" and row["tokens_per_s"] is None and row["runs"] == 0


def test_report_table_ratios_and_errors():
    from benchmarks.report import markdown, summary

    base = {"kind": "generation", "prompts": 8, "generations": 8, "prompt_len": 128, "max_completion_length": 512,
            "model": "m", "runs": 3, "generated_tokens": [32768] * 3}  # fmt: skip
    rows = [
        {**base, "provider": "transformers", "seconds": [4.0, 4.1, 3.9], "tokens_per_s": 8192.0, "peak_mb": 3000.0},
        {**base, "provider": "continuous_batching", "seconds": [2.0], "tokens_per_s": 16384.0, "peak_mb": 40000.0,
         "runs": 1, "generated_tokens": [32768], "error": "cut by the deadline after 1 of 3 timed runs"},
        {**base, "provider": "transformers_logprobs", "seconds": [], "generated_tokens": [], "runs": 0,
         "tokens_per_s": None, "error": "out of memory"},
    ]  # fmt: skip
    text = markdown(rows)
    assert "8 prompts x 8 generations, 128-token prompts, at most 512 new tokens; m" in text
    assert "| transformers | 8192 | 1.00x | 4.00, 4.10, 3.90 | 32768, 32768, 32768 | 3000 |  |" in text
    assert "| continuous_batching | 16384 | 2.00x | 2.00 | 32768 | 40000 | cut by the deadline after 1 of 3" in text
    assert "| transformers_logprobs |  |  |  |  |  | out of memory |" in text
    entries = summary(rows)["generation"]
    assert [e["provider"] for e in entries] == ["transformers", "continuous_batching", "transformers_logprobs"]
    assert "kind" not in entries[0] and entries[1]["error"].startswith("cut by the deadline")


def test_gpu_check_generation_smoke_writes_the_call_files(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "TRITON_INTERPRET": "1"}
    command = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "generation", "--smoke",
               "--provider", "transformers"]  # fmt: skip
    result = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + (tmp_path / "run.log").read_text()[-3000:]
    assert {p.name for p in tmp_path.iterdir()} == {"nvidia_smi.txt", "run.log", "generation.jsonl", "report.md",
                                                    "summary.json", "results.csv"}  # fmt: skip
    (entry,) = json.loads((tmp_path / "summary.json").read_text())["generation"]
    assert entry["provider"] == "transformers" and entry["tokens_per_s"] > 0
    assert "## Generation" in result.stdout  # the report is printed: it ends up in the device call's output
