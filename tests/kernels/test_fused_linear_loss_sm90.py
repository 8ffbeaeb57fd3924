"""The fused linear loss kernels compile for Hopper (sm_90) without a GPU: the forward at its pinned tiles (those of
fused_linear_logprob) on wgmma (16-bit inputs), persistent, with pipelined loads that run ahead of each tile's
epilogue (no pipeline drain between tiles), within shared memory and (where Triton's ptxas reads its PTX) without
spills under every flag set; the element-wise dlogits kernel with 16-byte accesses to the buffer and no spills.

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
    return compile_reports(Path(__file__))


def test_forward_is_persistent_pipelined_and_on_wgmma(reports):
    forwards = [r for r in reports if r["kernel"] == "fwd"]
    assert len(forwards) == 4
    for r in forwards:
        assert_persistent_pipelined_forward(r)


def test_no_spills(reports):
    assert_no_spills(reports)


def test_dlogits_moves_16_bytes_at_a_time(reports):
    (r,) = [r for r in reports if r["kernel"] == "dlogits"]
    assert r["vector_loads"], r


if __name__ == "__main__":
    main()
