"""The fused linear loss kernels compile for Hopper (sm_90) without a GPU: the forward at its pinned tiles (those of
fused_linear_logprob) on wgmma (16-bit inputs), persistent, with pipelined loads that run ahead of each tile's
epilogue (no pipeline drain between tiles), within shared memory and (where Triton's ptxas reads its PTX) without
spills under every flag set; the element-wise dlogits kernel with 16-byte accesses to the buffer and no spills.

Run as a script (TRITON_INTERPRET unset), this file prints one JSON line per variant, using the compile machinery of
tests/kernels/sm90_compile.py; the tests run it in a subprocess.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# one worker compiles them all (under xdist each worker would repeat the module fixture's compile)
pytestmark = pytest.mark.xdist_group("sm90_compile")

HOPPER_SHARED_MEMORY = 227 * 1024  # the per-block limit on sm_90
FWD_FLAG_SETS = {
    "logprob": {},
    "entropy+argmax": {"HAS_ENTROPY": True, "HAS_ARGMAX": True},
    "all-stats": {"HAS_ENTROPY": True, "HAS_MEAN": True, "HAS_ARGMAX": True, "HAS_SQ": True},
}


def _pointers(jit_fn, dtype: str) -> dict:
    types = {"h_ptr": dtype, "w_ptr": dtype, "b_ptr": dtype, "exp_ptr": dtype, "buf_ptr": dtype, "tgt_ptr": "*i64",
             "part_arg_ptr": "*i32"}  # fmt: skip
    return {name: types.get(name, "*fp32") for name in jit_fn.arg_names if name.endswith("_ptr")}


def main():
    sys.path.insert(0, str(Path(__file__).parent))
    import posttrain.kernels.fused_linear_loss as fll
    import torch
    from sm90_compile import compile_variant

    fwd = fll._fused_linear_loss_fwd_kernel
    no_stats = dict.fromkeys(("HAS_ENTROPY", "HAS_MEAN", "HAS_ARGMAX", "HAS_SQ"), False)
    for dtype, torch_dtype in (("*bf16", torch.bfloat16), ("*fp32", torch.float32)):
        config = fll.pinned_tile(torch_dtype)
        for flags_name, flags in FWD_FLAG_SETS.items():
            if dtype == "*fp32" and flags_name != "all-stats":
                continue  # the fp32 tile is small: only its heaviest epilogue is worth the compile time
            precision = "ieee" if dtype == "*fp32" else "tf32"
            constexprs = {**config.kwargs, **no_stats, **flags, "HAS_BIAS": False, "SCALED": False, "EVEN_K": True,
                          "PRECISION": precision, "stride_hk": 1, "stride_wk": 1}  # fmt: skip
            report = compile_variant(fwd, _pointers(fwd, dtype), constexprs, ("K", "stride_hn", "stride_wv",
                                     "split_v", "stride_en"), config.num_warps, config.num_stages)  # fmt: skip
            print(json.dumps({"kernel": "fwd", "dtype": dtype[1:], "flags": flags_name, **report}), flush=True)
    dlogits = fll._fused_linear_loss_dlogits_kernel
    tile_v = fll.pinned_tile(torch.bfloat16).kwargs["BLOCK_V"]
    constexprs = {"SCALED": True, "HAS_GRAD_LOGPROB": True, "HAS_GRAD_ENTROPY": True, "TILE_V": tile_v,
                  "BLOCK_N": fll._DLOGITS_ELEMENTS // tile_v}  # fmt: skip
    report = compile_variant(dlogits, _pointers(dlogits, "*bf16"), constexprs, ("V", "stride_bn"), 8, 1)
    print(json.dumps({"kernel": "dlogits", "dtype": "bf16", "flags": "both-grads", **report}), flush=True)


@pytest.fixture(scope="module")
def reports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, __file__], check=False, capture_output=True, text=True, env=env, timeout=900
    )
    if result.returncode != 0 and "ModuleNotFoundError" in result.stderr and "triton" in result.stderr:
        pytest.skip("triton is not installed")
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_forward_is_persistent_pipelined_and_on_wgmma(reports):
    forwards = [r for r in reports if r["kernel"] == "fwd"]
    assert len(forwards) == 4
    for r in forwards:
        assert r["pipelined"] and r["persistent"] and r["flat"], r
        # sm90_compile's criterion: the next tile's loads are issued before this tile's epilogue, with no full drain
        assert r["prefetch_before_epilogue"] and not r["drains_in_loop"], r
        assert r["wgmma"] or r["dtype"] == "fp32", r  # fp32 runs IEEE dots, off the tensor cores
        assert r["shared"] <= HOPPER_SHARED_MEMORY, r


def test_no_spills(reports):
    checked = [r for r in reports if "spill_bytes" in r]
    if not checked:
        pytest.skip("Triton ships no ptxas that reads its PTX here")
    for r in checked:
        assert r["spill_bytes"] == 0, r


def test_dlogits_moves_16_bytes_at_a_time(reports):
    (r,) = [r for r in reports if r["kernel"] == "dlogits"]
    assert r["vector_loads"], r


if __name__ == "__main__":
    main()
