"""The fused linear divergence kernels compile for Hopper (sm_90) without a GPU: the forward at its pinned tiles on
wgmma (16-bit inputs), persistent, with pipelined loads that run ahead of each tile's epilogue (no pipeline drain
between tiles, although a tile switches from the student's operands to the teacher's), within shared memory and (where
Triton's ptxas reads its PTX) without spills, for each divergence and with or without the buffers; the element-wise
kernels (the JSD's reduction, dlogits) with 16-byte accesses to the buffers and no spills.

Run as a script (TRITON_INTERPRET unset), this file prints one JSON line per variant, using the compile machinery of
tests/kernels/sm90_compile.py; the tests run it in a subprocess.
"""

import json
import sys
from pathlib import Path

import pytest
from sm90_checks import assert_no_spills, assert_persistent_pipelined_forward, compile_reports

# one worker compiles them all (under xdist each worker would repeat the module fixture's compile)
pytestmark = pytest.mark.xdist_group("sm90_compile")

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
    return compile_reports(Path(__file__))


def test_forward_is_persistent_pipelined_and_on_wgmma(reports):
    forwards = [r for r in reports if r["kernel"] == "fwd"]
    assert len(forwards) == 4
    for r in forwards:
        assert_persistent_pipelined_forward(r)


def test_no_spills(reports):
    import triton

    # Triton 3.6 (the GPU image's) keeps the student's logits live into the forward KL's cross term: 128 bytes a thread
    # spill there (none under 3.9; the default beta = 1 is the reverse KL, which does not spill)
    triton36 = tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 9)
    assert_no_spills(reports, known={("fwd", "bf16", "forward-kl+buffers"): 128} if triton36 else None)


def test_element_wise_kernels_move_16_bytes_at_a_time(reports):
    element_wise = [r for r in reports if r["kernel"] in ("reduce", "dlogits")]
    assert len(element_wise) == 2
    for r in element_wise:
        assert r["vector_loads"], r


if __name__ == "__main__":
    main()
