"""Compile posttrain's matmul kernels for Hopper (sm_90) without a GPU and report what the compiler made of them.

Run as a script with TRITON_INTERPRET unset (tests/kernels/test_sm90_compile.py does): prints one JSON line per
kernel variant with its shared memory, whether the K loop is pipelined (async copies into shared memory) and on
wgmma, and, where Triton ships a ptxas that reads its PTX, registers and spill bytes. The integer arguments that are
multiples of 16 and the unit strides are specialized as Triton's JIT specializes them at run time.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import posttrain.kernels.fused_linear_logprob as flp
import posttrain.kernels.selective_log_softmax as sls

TARGET = GPUTarget("cuda", 90, 128)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")

FWD_POINTERS = {"h_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "part_arg_ptr": "*i32",
                **{n: "*fp32" for n in ("part_max_ptr", "part_sum_ptr", "part_ent_ptr", "part_zsum_ptr",
                                        "part_sq_ptr")}}  # fmt: skip
BWD_POINTERS = {"h_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "dlogits_ptr": "*bf16", "tgt_ptr": "*i64",
                **{n: "*fp32" for n in ("max_ptr", "log_sum_ptr", "ent_ptr", "grad_logprob_ptr",
                                        "grad_entropy_ptr")}}  # fmt: skip
FLAG_SETS = {
    "logprob": {"HAS_ENTROPY": False, "HAS_MEAN": False, "HAS_ARGMAX": False, "HAS_SQ": False},
    "entropy+argmax": {"HAS_ENTROPY": True, "HAS_MEAN": False, "HAS_ARGMAX": True, "HAS_SQ": False},
}


def _registers(ptx: str) -> dict:
    if not os.path.exists(PTXAS):
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        result = subprocess.run([PTXAS, "-arch=sm_90a", "-v", path, "-o", path + ".cubin"], capture_output=True,
                                text=True)  # fmt: skip
    regs = re.findall(r"Used (\d+) registers", result.stderr)
    spills = re.findall(r"(\d+) bytes spill stores", result.stderr)
    return {"registers": int(regs[0]), "spill_bytes": int(spills[0])} if regs and spills else {}


def compile_variant(jit_fn, pointers: dict, constexprs: dict, multiples_of_16: tuple, warps: int, stages: int):
    names = jit_fn.arg_names
    signature, values = {}, {}
    for name in names:
        if name in pointers:
            signature[name] = pointers[name]
        elif name in constexprs:
            signature[name] = "constexpr"
            values[(names.index(name),)] = constexprs[name]
        else:
            signature[name] = "fp32" if name == "temperature" else "i32"
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in (*pointers, *multiples_of_16) if n in names}
    kernel = triton.compile(ASTSource(fn=jit_fn, signature=signature, constexprs=values, attrs=attrs),
                            target=TARGET, options={"num_warps": warps, "num_stages": stages})  # fmt: skip
    ttgir = kernel.asm["ttgir"]
    ptx = kernel.asm["ptx"]
    return {"shared": kernel.metadata.shared, "pipelined": "async_copy_global_to_local" in ttgir,
            "wgmma": "warp_group_dot" in ttgir, "vector_loads": bool(re.search(r"ld\.global[.\w]*\.v4", ptx)),
            **_registers(ptx)}  # fmt: skip


def main():
    fwd = flp._fused_linear_logprob_fwd_kernel.fn.fn  # autotuner -> heuristics -> the jit function
    bwd = flp._fused_linear_logprob_bwd_kernel.fn.fn
    for bn, bv, bk, warps, stages in flp.HOPPER_TILES:
        tile = {"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk, "GROUP_N": 8, "HAS_BIAS": False, "SCALED": False,
                "EVEN_K": True, "PRECISION": "tf32", "stride_hk": 1, "stride_wk": 1}  # fmt: skip
        label = f"{bn}x{bv}x{bk}-w{warps}-s{stages}"
        for flags_name, flags in FLAG_SETS.items():
            report = compile_variant(fwd, FWD_POINTERS, {**tile, **flags}, ("K", "stride_hn", "stride_wv", "split_v"),
                                     warps, stages)  # fmt: skip
            print(json.dumps({"kernel": "fwd", "tile": label, "flags": flags_name, **report}), flush=True)
        bwd_flags = {"HAS_GRAD_LOGPROB": True, "HAS_GRAD_ENTROPY": True}
        report = compile_variant(bwd, BWD_POINTERS, {**tile, **bwd_flags},
                                 ("K", "stride_hn", "stride_wv", "stride_dn", "v_start", "num_cols"), warps, stages)
        print(json.dumps({"kernel": "bwd", "tile": label, "flags": "both-grads", **report}), flush=True)
    # selective_log_softmax: memory-bound, so what matters is 16-byte loads of the bf16 logits
    rows = {"logits_ptr": "*bf16", "tgt_ptr": "*i64", "grad_logits_ptr": "*bf16",
            **{n: "*fp32" for n in ("logprob_ptr", "entropy_ptr", "max_ptr", "log_sum_ptr", "ent_ptr",
                                    "grad_logprob_ptr", "grad_entropy_ptr")}}  # fmt: skip
    for name, jit_fn, consts in (
        ("selective_fwd", sls._selective_log_softmax_fwd_kernel,
         {"SCALED": False, "HAS_ENTROPY": True, "BLOCK_V": 4096}),
        ("selective_bwd", sls._selective_log_softmax_bwd_kernel,
         {"SCALED": False, "HAS_GRAD_LOGPROB": True, "HAS_GRAD_ENTROPY": True, "BLOCK_V": 2048}),
    ):  # fmt: skip
        pointers = {n: t for n, t in rows.items() if n in jit_fn.arg_names}
        report = compile_variant(jit_fn, pointers, consts, ("V", "stride_row", "stride_grad_row"), 8, 3)
        print(json.dumps({"kernel": name, "tile": "row", "flags": "entropy", **report}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
