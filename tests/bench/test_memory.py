"""The longest-sequence search (benchmarks/memory.py): the doubling and bisection, workers restarted after an OOM that
leaves memory behind, warm starts, deadlines and errors (with fake workers); the report's table and summary fields;
and `gpu_check.sh OUT memory --smoke`, the real subprocess workers on the CPU."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("benchmarks", reason="needs a posttrain checkout (tests/bench/conftest.py imports benchmarks/)")

ROOT = Path(__file__).resolve().parents[2]


def _search(capacity, bounds, start=None):
    from benchmarks.memory import Search, next_length

    search, tried = Search("dpo", "trl", start=start), []
    while (length := next_length(search, bounds)) is not None:
        tried.append(length)
        search.apply({"seq_len": length, "fits": length <= capacity, "oom": length > capacity})
    return search, tried


@pytest.mark.parametrize("capacity", [8192, 20000, 50000, 99999])
def test_search_brackets_the_capacity_within_an_eighth(capacity):
    from benchmarks.memory import GPU_BOUNDS, status_of

    search, tried = _search(capacity, GPU_BOUNDS)
    assert search.best <= capacity < search.fail and search.fail - search.best <= max(1024, search.best // 8)
    assert status_of(search, GPU_BOUNDS) == "found" and search.probes == len(tried) == len(set(tried))
    assert all(length % 1024 == 0 for length in tried) and tried[0] == GPU_BOUNDS.start


def test_search_ends_at_the_limit_goes_down_from_a_high_start_and_may_find_nothing():
    from benchmarks.memory import GPU_BOUNDS, status_of

    search, tried = _search(10**9, GPU_BOUNDS)
    assert tried == [8192, 16384, 32768, 65536, 131072] and status_of(search, GPU_BOUNDS) == "at the limit"
    search, tried = _search(5000, GPU_BOUNDS, start=65536)  # a warm start above what fits: halve first
    assert tried[:5] == [65536, 32768, 16384, 8192, 4096] and search.best <= 5000 < search.fail
    search, tried = _search(100, GPU_BOUNDS)
    assert search.best is None and tried[-1] == 1024 and status_of(search, GPU_BOUNDS) == "nothing fits"


class _FakeWorkers:
    """spawn(searches, done, on_row) like memory._spawn, over fake capacities per (trainer, variant): a worker runs
    the searches in order and exits (status 3) after each OOM, as a real one does when memory is left behind."""

    def __init__(self, capacity, bounds, errors=(), dead=(), stop_after=None):
        self.capacity, self.bounds, self.errors, self.dead = capacity, bounds, set(errors), set(dead)
        self.stop_after, self.spawns, self.probed = stop_after, 0, []

    def __call__(self, searches, done, on_row):
        from benchmarks.memory import Search, next_length, warm_start

        self.spawns += 1
        finished = [Search(**vars(s)) for s in done]
        for original in searches:
            search = Search(**vars(original))
            warm_start(search, finished)
            finished.append(search)
            key = (search.trainer, search.variant)
            if key in self.dead:
                return -11  # died in its first probe: nothing printed
            while (length := next_length(search, self.bounds)) is not None:
                if self.stop_after is not None and len(self.probed) >= self.stop_after:
                    return 0  # what a worker does at the deadline
                row = {"kind": "probe", "trainer": key[0], "variant": key[1], "seq_len": length}
                if key in self.errors:
                    row.update(fits=False, oom=False, error="ImportError: no bitsandbytes GPU library")
                else:
                    fits = length <= self.capacity[key]
                    row.update(fits=fits, oom=not fits, tokens_per_s=float(length), peak_mb=length / 100,
                               seconds=1.0)  # fmt: skip
                self.probed.append(row)
                on_row(row)
                search.apply(row)
                if row.get("oom"):
                    return 3
        return 0


def _recorder():
    from benchmarks.sink import Recorder

    return Recorder(log=lambda _: None)


def test_search_all_restarts_workers_warm_starts_and_records_each_result():
    from benchmarks.memory import GPU_BOUNDS, Search, search_all

    capacity = {("dpo", "trl"): 20000, ("dpo", "posttrain"): 70000, ("grpo", "trl"): 40000}
    spawn = _FakeWorkers(capacity, GPU_BOUNDS)
    recorder = _recorder()
    groups = [[Search("dpo", "trl"), Search("dpo", "posttrain"), Search("grpo", "trl")]]
    search_all(groups, GPU_BOUNDS, spawn, recorder, deadline=None)
    results = {(r["trainer"], r["variant"]): r for r in recorder.rows if r["kind"] == "max_seq"}
    assert list(results) == [("dpo", "trl"), ("dpo", "posttrain"), ("grpo", "trl")]  # each as soon as it is over
    for key, row in results.items():
        assert row["status"] == "found" and row["max_seq_len"] <= capacity[key] < row["first_oom_len"]
        assert row["tokens_per_s"] == row["max_seq_len"] and row["peak_mb"] == row["max_seq_len"] / 100
    ooms = sum(1 for r in spawn.probed if r.get("oom"))
    assert spawn.spawns == ooms + 1  # a fresh worker after every OOM, one more to begin
    first_posttrain = next(r for r in spawn.probed if r["variant"] == "posttrain")
    assert first_posttrain["seq_len"] == results[("dpo", "trl")]["max_seq_len"]  # started at TRL's longest fit
    assert [r for r in recorder.rows if r["kind"] == "probe"] == spawn.probed


def test_search_all_gives_up_on_errors_and_dead_workers_and_marks_the_deadline(monkeypatch):
    from benchmarks import memory
    from benchmarks.memory import GPU_BOUNDS, Search, search_all

    capacity = {("sft", "trl"): 50000, ("sft", "posttrain"): 50000}
    spawn = _FakeWorkers(capacity, GPU_BOUNDS, errors={("sft", "trl_qlora")}, dead={("sft", "posttrain_qlora")})
    recorder = _recorder()
    groups = [[Search("sft", "trl_qlora"), Search("sft", "posttrain_qlora"), Search("sft", "trl")]]
    search_all(groups, GPU_BOUNDS, spawn, recorder, deadline=None)
    results = {r["variant"]: r for r in recorder.rows if r["kind"] == "max_seq"}
    assert results["trl_qlora"]["status"] == "error" and "bitsandbytes" in results["trl_qlora"]["error"]
    assert results["posttrain_qlora"]["status"] == "error" and "status -11" in results["posttrain_qlora"]["error"]
    assert results["trl"]["status"] == "found"
    spawn = _FakeWorkers(capacity, GPU_BOUNDS, stop_after=2)  # the deadline passes after two probes
    monkeypatch.setattr(memory, "past", lambda deadline, margin_s=0.0: len(spawn.probed) >= 2)
    recorder = _recorder()
    search_all([[Search("sft", "trl"), Search("sft", "posttrain")]], GPU_BOUNDS, spawn, recorder, deadline=1.0)
    results = {r["variant"]: r for r in recorder.rows if r["kind"] == "max_seq"}
    assert results["trl"]["status"] == "cut by the deadline" and results["trl"]["max_seq_len"] == 16384
    assert results["posttrain"]["status"] == "cut by the deadline" and results["posttrain"]["max_seq_len"] is None


# the QLoRA variants are planned and run only where bitsandbytes is importable (else dropped with a note)
needs_bitsandbytes = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                        reason="bitsandbytes is an optional extra: pip install 'posttrain[qlora]'")  # fmt: skip


@needs_bitsandbytes
def test_plan_drops_what_cannot_run_and_orders_by_tier_then_trainer():
    from benchmarks.memory import TRAINERS, VARIANTS, _plan

    recorder = _recorder()
    groups = _plan(list(TRAINERS), list(VARIANTS), "cpu", recorder)
    assert [r["text"] for r in recorder.rows] == ["memory: trl_liger: dropped, does not run on cpu"]
    (shared,) = groups
    order = [(s.trainer, s.variant) for s in shared]
    assert order[:3] == [("dpo", "trl"), ("dpo", "posttrain"), ("dpo", "posttrain_offload_tiled")]
    assert order[3] == ("grpo", "trl") and order[9] == ("dpo", "trl_qlora") and len(order) == 18
    groups = _plan(["dpo"], ["trl", "trl_liger"], "cuda", _recorder())
    assert [[s.variant for s in g] for g in groups] == [["trl"], ["trl_liger"]]  # Liger in a worker of its own


def _max_seq(trainer, variant, length, status, **extra):
    return {"kind": "max_seq", "trainer": trainer, "variant": variant, "max_seq_len": length, "status": status,
            "first_oom_len": None, "probes": 3, "tokens_per_s": 1000.0, "peak_mb": 70000.0, **extra}  # fmt: skip


def test_report_table_bounds_and_summary_fields():
    from benchmarks.report import markdown, summary

    rows = [
        {"kind": "trainer", "trainer": "dpo", "model": "m", "seq_len": 1024, "tokens_per_s": 10.0},
        _max_seq("dpo", "trl", 16384, "found"),
        _max_seq("dpo", "posttrain", 40960, "found"),
        _max_seq("dpo", "posttrain_offload_tiled", 131072, "at the limit"),
        _max_seq("dpo", "trl_qlora", None, "error", error="ImportError: bitsandbytes"),
        _max_seq("grpo", "trl", 65536, "cut by the deadline"),
        _max_seq("grpo", "posttrain", 98304, "found"),
    ]
    text = markdown(rows)
    assert "| dpo | posttrain | 40960 | 2.50x | found | 1000 | 70000 |" in text
    assert "| dpo | posttrain_offload_tiled | 131072 | >= 8.00x | at the limit |" in text  # a lower bound
    assert "| grpo | posttrain | 98304 | <= 1.50x | found |" in text  # TRL's was cut: an upper bound
    assert "| dpo | trl_qlora |  |  | error: ImportError: bitsandbytes |" in text
    result = summary(rows)
    dpo, grpo = result["trainers"]
    assert (dpo["max_seq_len"], dpo["trl_max_seq_len"], dpo["offload_tiled_max_seq_len"]) == (40960, 16384, 131072)
    assert dpo["tokens_per_s"] == 10.0 and dpo["max_seq_tokens_per_s"] == 1000.0
    assert dpo["trl_qlora_max_seq_len"] is None  # the search failed
    assert (grpo["trainer"], grpo["max_seq_len"], grpo["trl_max_seq_len"]) == ("grpo", 98304, 65536)
    assert [r["variant"] for r in result["max_seq"]][:2] == ["trl", "posttrain"] and "kind" not in result["max_seq"][0]


@needs_bitsandbytes
def test_gpu_check_memory_smoke_runs_real_workers(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "TRITON_INTERPRET": "1"}
    command = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "memory", "--smoke", "--trainer",
               "sft", "grpo", "--variant", "trl", "posttrain_qlora_offload_tiled", "trl_liger"]  # fmt: skip
    result = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + (tmp_path / "run.log").read_text()[-3000:]
    assert {p.name for p in tmp_path.iterdir()} == {"nvidia_smi.txt", "run.log", "memory.jsonl", "report.md",
                                                    "summary.json", "results.csv"}  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "memory.jsonl").read_text().splitlines()]
    probes = [(r["trainer"], r["variant"], r["seq_len"], r["fits"]) for r in rows if r["kind"] == "probe"]
    assert probes == [("grpo", "trl", 16, True), ("grpo", "trl", 32, True), ("sft", "trl", 16, True),
                      ("sft", "trl", 32, True), ("grpo", "posttrain_qlora_offload_tiled", 32, True),
                      ("sft", "posttrain_qlora_offload_tiled", 32, True)]  # fmt: skip
    assert all(r["tokens_per_s"] > 0 for r in rows if r["kind"] == "probe")
    results = [(r["trainer"], r["variant"], r["max_seq_len"], r["status"]) for r in rows if r["kind"] == "max_seq"]
    assert sorted(results) == sorted((t, v, 32, "at the limit") for t in ("sft", "grpo")
                                     for v in ("trl", "posttrain_qlora_offload_tiled"))  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {r["trainer"]: r["qlora_offload_tiled_max_seq_len"] for r in summary["trainers"]} == {"grpo": 32, "sft": 32}
    assert "memory: trl_liger: dropped, does not run on cpu" in summary["notes"]
    assert "## Longest sequence that trains one step" in result.stdout  # the report ends up in the call's output


def test_packed_bitsandbytes_wheel_keeps_only_the_cuda_13_library(tmp_path):
    import zipfile

    pytest.importorskip("bitsandbytes")
    from benchmarks.pack_bitsandbytes import KEEP_LIBRARY, pack

    wheel = pack(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    libraries = [n for n in names if Path(n).name.startswith("libbitsandbytes_")]
    assert libraries == [f"bitsandbytes/{KEEP_LIBRARY}"] and "bitsandbytes/__init__.py" in names
    record = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/RECORD"))).decode()
    assert {line.split(",")[0] for line in record.splitlines()} == set(names)  # every file listed, nothing else
    assert wheel.stat().st_size < 8 * 2**20  # well inside the device call's 64 MiB carry limit
