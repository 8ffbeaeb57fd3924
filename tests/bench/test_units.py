"""The benchmark suite's parts, in process: rows flushed as measured, deadlines, the report and summary.json built from
rows, the tile sweep's pinning, the timer's samples."""

import json

import pytest
import torch
import triton
import triton.language as tl

pytest.importorskip("benchmarks", reason="needs a posttrain checkout (tests/bench/conftest.py imports benchmarks/)")


def test_recorder_flushes_each_row_and_reads_back_a_cut_file(tmp_path):
    from benchmarks.sink import Recorder, read_rows

    path = tmp_path / "rows.jsonl"
    recorder = Recorder(path, log=lambda _: None, phase="verify")
    recorder.record({"kind": "op", "ms_p50": 1.5})
    assert json.loads(path.read_text()) == {"kind": "op", "ms_p50": 1.5, "phase": "verify"}  # on disk before close
    recorder.note("liger: dropped")
    with open(path, "a") as f:
        f.write('{"kind": "op", "ms_p')  # what a kill in the middle of a write leaves
    assert [r["kind"] for r in read_rows(path)] == ["op", "note"]
    Recorder(path, log=lambda _: None).record({"kind": "env"})  # the next phase appends after the cut line
    assert [r["kind"] for r in read_rows(path)] == ["op", "note", "env"]


def test_cpu_timer_takes_at_least_five_samples():
    from benchmarks.timing import quantiles_ms

    calls = []
    timing = quantiles_ms(lambda: calls.append(1), torch.device("cpu"))
    assert timing.samples >= 5 and len(calls) == timing.samples + 1  # one warm-up
    assert 0 <= timing.p20 <= timing.p50 <= timing.p80


def test_run_op_stops_at_the_deadline_with_a_note():
    from benchmarks.registry import REGISTRY
    from benchmarks.runner import run_op
    from benchmarks.sink import Recorder

    recorder = Recorder(log=lambda _: None)
    bench = REGISTRY["dpo_loss"]
    run_op(bench, bench.smoke_shapes, [torch.float32], ["forward"], torch.device("cpu"), recorder, deadline=1.0)
    notes = [r["text"] for r in recorder.rows if r["kind"] == "note"]
    assert len(notes) == len(recorder.rows)  # nothing measured
    assert "torch_compile: dropped, does not run on cpu" in notes[0] and "deadline reached" in notes[-1]
    run_op(bench, bench.smoke_shapes, [torch.float32], ["forward"], "cpu", recorder, only=["torch"])
    (row,) = [r for r in recorder.rows if r["kind"] == "op"]
    assert row["provider"] == "torch" and row["samples"] >= 5 and row["ms_p50"] > 0


def _rows():
    shape = {"N": 8192, "H": 896, "V": 151936}
    env = {"kind": "env", "gpu": "NVIDIA H200", "torch": "2.11", "triton": "3.6", "transformers": "5.17",
           "trl": "1.16.0", "liger_kernel": "0.8.5", "commit": "abc1234", "date": "2026-12-06"}  # fmt: skip

    def op(name, provider, ms, **extra):
        return {"kind": "op", "op": name, "provider": provider, "mode": "full", "shape": "N=8192,H=896,V=151936",
                "dtype": "bfloat16", **shape, "ms_p20": ms * 0.9, "ms_p50": ms, "ms_p80": ms * 1.1, "samples": 7,
                "peak_mb": 10 * ms, "tflops": 100.0, **extra}  # fmt: skip

    floor = {"logits_ms": 2.0, "dh_ms": 2.5, "dw_ms": 3.0, "floor4_ms": 9.5, "floor3_ms": 7.5}
    verify = {"shape": "N=8192,H=896,V=151936", "dtype": "bfloat16", "reference": "float32", "logprobs_max": 0.01,
              "d_weight_rel": 0.003}  # fmt: skip
    return [
        env,
        {"kind": "ceiling", "name": "matmul_tflops_bfloat16", "value": 800.0},
        {"kind": "floor", **shape, "dtype": "bfloat16", **floor},
        {"kind": "note", "text": "fused_linear_logprob: torch_compile: dropped, does not run on cpu"},
        op("fused_linear_logprob", "posttrain", 12.0),
        op("fused_linear_logprob", "trl", 16.0),
        op("fused_linear_logprob", "liger", 20.0),
        {**op("fused_linear_logprob", "torch_compile", 1.0), "ms_p50": None, "error": "out of memory"},
        op("fused_linear_loss_sft", "posttrain", 9.0),
        op("fused_linear_loss_sft", "trl", 17.0),
        op("fused_linear_loss_grpo", "trl", 18.0),
        {"kind": "verify", "op": "fused_linear_logprob", "impl": "posttrain", **verify},
        {"kind": "trainer", "trainer": "sft", "model": "m", "seq_len": 2048, "tokens_per_s": 100.0, "peak_mb": 5.0},
        {"kind": "trainer", "trainer": "sft", "trl_tokens_per_s": 80.0, "trl_peak_mb": 6.0},
        {"kind": "phase", "phase": "tests", "status": "timeout", "rc": 124, "seconds": 170},
    ]


def test_summary_keeps_its_fields_and_adds_the_fused_loss():
    from benchmarks.report import summary

    result = summary(_rows())
    assert result["device"] == "NVIDIA H200" and result["commit"] == "abc1234"
    (logprob,) = result["fused_linear_logprob"]
    assert logprob["ms"] == 12.0 and logprob["trl_ms"] == 16.0 and logprob["liger_ms"] == 20.0
    assert logprob["peak_mb"] == 120.0 and logprob["trl_peak_mb"] == 160.0
    assert logprob["gemm_floor_ms"] == 9.5  # four GEMMs: the logits are recomputed
    assert logprob["ms_p20"] == pytest.approx(10.8) and logprob["trl_ms_p80"] == pytest.approx(17.6)
    sft, grpo = result["fused_linear_loss"]
    assert (sft["loss"], sft["ms"], sft["trl_ms"], sft["gemm_floor_ms"]) == ("sft", 9.0, 17.0, 7.5)  # three GEMMs
    assert grpo["loss"] == "grpo" and "ms" not in grpo and grpo["trl_ms"] == 18.0
    (trainer,) = result["trainers"]
    assert trainer == {"trainer": "sft", "model": "m", "seq_len": 2048, "tokens_per_s": 100.0, "peak_mb": 5.0,
                       "trl_tokens_per_s": 80.0, "trl_peak_mb": 6.0}  # fmt: skip
    assert result["verify"][0]["logprobs_max"] == 0.01
    assert result["notes"] == ["fused_linear_logprob: torch_compile: dropped, does not run on cpu"]


def test_report_carries_notes_floors_phases_tests_and_labels_liger():
    from benchmarks.report import markdown

    log = "FAILED tests/ops/test_x.py::test_y - assert 1 == 2\n==== 1 failed, 5 passed in 80.1s ====\n"
    text = markdown(_rows(), tests_log=log)
    assert "- fused_linear_logprob: torch_compile: dropped, does not run on cpu" in text
    assert "liger (sum loss: easier problem) ms" in text and "easier sum-loss problem" in text
    assert "12.000 (10.800-13.200)" in text  # median and p20-p80
    assert "| 1.33x |" in text  # TRL 16 ms against posttrain 12 ms
    assert "| 9.500 | 0.79 |" in text  # the floor and floor / posttrain
    assert "| tests | timeout | 124 | 170 |" in text
    assert "1 failed, 5 passed in 80.1s" in text and "FAILED tests/ops/test_x.py::test_y" in text
    assert "out of memory" in text
    assert "| sft | m | 2048 | 100 | 80 | 1.25x |" in text


def test_a_killed_pytest_is_reported_as_such():
    from benchmarks.report import tests_summary

    assert tests_summary("....s.\n") == ["no pytest summary line: killed at its cap?"]
    assert tests_summary("15 skipped, 414 deselected in 11.93s\n") == ["15 skipped, 414 deselected in 11.93s"]


@triton.jit
def _add_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1.0, mask=offs < n)


class _Tiled:
    """What kernels/_common.py's TiledKernel offers the sweep under POSTTRAIN_AUTOTUNE=1: a pinned(dtype) tile and an
    autotuner over every tile, pruned to those usable for the launch's dtype."""

    def __init__(self, tiles, usable):
        self.fn = _add_kernel
        self.pinned = lambda dtype: tiles[0]
        prune = {"early_config_prune": lambda configs, named, **_: usable(named["x_ptr"].dtype)}
        self.tuner = triton.autotune(tiles, key=["n"], prune_configs_by=prune)(_add_kernel)
        self.launched = []

    def __call__(self, x):
        config = self.pinned(x.dtype)  # the sweep pins it: the tuner is never used
        self.launched.append(config.kwargs["BLOCK"])
        _add_kernel[(triton.cdiv(x.numel(), config.kwargs["BLOCK"]),)](x, x.numel(), **config.kwargs)


def _tile(block):
    return triton.Config({"BLOCK": block}, num_warps=4, num_stages=1)


def test_tile_sweep_pins_each_candidate_and_restores_the_kernels():
    import types

    from benchmarks.sink import Recorder
    from benchmarks.tiles import sweep, tunables
    from benchmarks.timing import Timing

    tiles = [_tile(16), _tile(32), _tile(64), _tile(128)]
    fwd = _Tiled(tiles, lambda dtype: tiles[:3] if dtype == torch.float32 else tiles[3:])
    bwd = _Tiled(tiles, lambda dtype: tiles[:1])
    tuned = triton.autotune([_tile(8), _tile(256)], key=["n"])(_add_kernel)
    module = types.SimpleNamespace(_fwd=fwd, _bwd=bwd, _tuned=tuned, pinned_tile=lambda dtype: _tile(16))
    kernels = tunables(module, torch.float32)
    assert {name: len(k.configs) for name, k in kernels.items()} == {"_fwd": 3, "_bwd": 1, "_tuned": 2}
    assert len(tunables(module, torch.float16)["_fwd"].configs) == 1
    x = torch.zeros(100)
    seen = []

    def measure(name):
        fwd(x), bwd(x)
        tuned[(1,)](x, x.numel())
        seen.append((name, module.pinned_tile(None).kwargs["BLOCK"], tuned.best_config.kwargs["BLOCK"]))
        return "forward", Timing(1.0, 2.0, 3.0, 5)

    recorder = Recorder(log=lambda _: None)
    assert sweep(kernels, measure, recorder, {"shape": "s"})
    assert fwd.launched == [16, 32, 64, 16, 16] and bwd.launched == [16] * 5  # each candidate, then the default
    assert seen == [("_fwd", 16, 8), ("_fwd", 32, 8), ("_fwd", 64, 8), ("_tuned", 16, 8), ("_tuned", 16, 256)]
    assert [(r["kernel"], r["default"]) for r in recorder.rows] == [
        ("_fwd", True), ("_fwd", False), ("_fwd", False), ("_tuned", True), ("_tuned", False)]  # fmt: skip
    assert recorder.rows[1]["config"] == "BLOCK=32, warps=4, stages=1" and recorder.rows[1]["ms_p50"] == 2.0
    assert fwd.pinned(None).kwargs["BLOCK"] == 16 and fwd.tuner is not None  # restored
    assert module.pinned_tile(None).kwargs["BLOCK"] == 16 and len(tuned.configs) == 2
    assert not sweep(kernels, measure, recorder, {"shape": "s"}, deadline=1.0)
    assert "deadline reached" in recorder.rows[-1]["text"]
