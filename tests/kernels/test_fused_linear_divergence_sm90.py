"""The fused linear divergence kernels compile for Hopper (sm_90) without a GPU: the forward at its pinned tiles on
wgmma (16-bit inputs), persistent, with pipelined loads that run ahead of each tile's epilogue (no pipeline drain
between tiles, although a tile switches from the student's operands to the teacher's), within shared memory and (where
Triton's ptxas reads its PTX) without spills, for each divergence and with or without the buffers; the element-wise
kernels (the JSD's reduction, dlogits) with 16-byte accesses to the buffers and no spills.

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
# (MODE, WRITE_BUFFERS): reverse KL values only (TRL's default beta = 1 without a gradient), forward KL with the
# buffers (training), the JSD (always with them)
FWD_VARIANTS = {"reverse-kl": (1, False), "forward-kl+buffers": (0, True), "jsd+buffers": (2, True)}


def _pointers(jit_fn, dtype: str) -> dict:
    typed = ("hs_ptr", "ws_ptr", "bs_ptr", "ht_ptr", "wt_ptr", "bt_ptr", "s_buf_ptr", "t_buf_ptr")
    return {name: dtype if name in typed else "*fp32" for name in jit_fn.arg_names if name.endswith("_ptr")}


def main():
    sys.path.insert(0, str(Path(__file__).parent))
    import posttrain.kernels.fused_linear_divergence as fld
    import torch
    from sm90_compile import compile_variant

    fwd = fld._fused_linear_divergence_fwd_kernel
    aligned = ("KS", "KT", "stride_hs_n", "stride_ws_v", "stride_ht_n", "stride_wt_v", "split_v", "stride_sb",
               "stride_tb")  # fmt: skip
    for dtype, torch_dtype in (("*bf16", torch.bfloat16), ("*fp32", torch.float32)):
        config = fld.pinned_tile(torch_dtype)
        for name, (mode, write) in FWD_VARIANTS.items():
            if dtype == "*fp32" and name != "forward-kl+buffers":
                continue  # the fp32 tile is small: only its heaviest epilogue is worth the compile time
            constexprs = {**config.kwargs, "HAS_S_BIAS": True, "HAS_T_BIAS": True, "SCALED": True, "MODE": mode,
                          "WRITE_BUFFERS": write, "EVEN_K": True, "PRECISION": "ieee" if dtype == "*fp32" else "tf32",
                          "stride_hs_k": 1, "stride_ws_k": 1, "stride_ht_k": 1, "stride_wt_k": 1}  # fmt: skip
            report = compile_variant(fwd, _pointers(fwd, dtype), constexprs, aligned, config.num_warps,
                                     config.num_stages)  # fmt: skip
            print(json.dumps({"kernel": "fwd", "dtype": dtype[1:], "flags": name, **report}), flush=True)
    tile_v = fld.pinned_tile(torch.bfloat16).kwargs["BLOCK_V"]
    block_n = fld._ELEMENTS // tile_v
    for name, jit_fn, constexprs in (
        ("reduce", fld._fused_linear_divergence_reduce_kernel,
         {"BLOCK_N": block_n, "TILE_V": tile_v, "TILES": fld._REDUCE_TILES}),
        ("dlogits", fld._fused_linear_divergence_dlogits_kernel,
         {"MODE": fld.JSD, "SCALED": True, "BLOCK_N": block_n, "TILE_V": tile_v}),
    ):  # fmt: skip
        report = compile_variant(jit_fn, _pointers(jit_fn, "*bf16"), constexprs, ("V", "stride_sb", "stride_tb"), 8, 1)
        print(json.dumps({"kernel": name, "dtype": "bf16", "flags": "jsd", **report}), flush=True)


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


def test_element_wise_kernels_move_16_bytes_at_a_time(reports):
    element_wise = [r for r in reports if r["kernel"] in ("reduce", "dlogits")]
    assert len(element_wise) == 2
    for r in element_wise:
        assert r["vector_loads"], r


if __name__ == "__main__":
    main()
