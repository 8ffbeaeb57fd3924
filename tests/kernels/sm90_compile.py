"""Compile posttrain's matmul kernels for Hopper (sm_90) without a GPU and report what the compiler made of them.

Run as a script with TRITON_INTERPRET unset (tests/kernels/test_sm90_compile.py does): prints one JSON line per
kernel variant with its shared memory, whether its loads are pipelined (async copies into shared memory) and its
MMAs on wgmma, registers and spill bytes (where Triton ships a ptxas that reads its PTX), and the shape of the loop
that holds the MMAs (see _mma_loop_facts). The integer arguments that are multiples of 16 and the unit strides are
specialized as Triton's JIT specializes them at run time; row counts and offsets are not (do_not_specialize).
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

STAT_FLAGS = ("HAS_ENTROPY", "HAS_MEAN", "HAS_ARGMAX", "HAS_SQ")
FWD_FLAG_SETS = {
    "logprob": {},
    "entropy+argmax": {"HAS_ENTROPY": True, "HAS_ARGMAX": True},
    "all-stats": dict.fromkeys(STAT_FLAGS, True),
}
BWD_FLAGS = {"HAS_GRAD_LOGPROB": True, "HAS_GRAD_ENTROPY": True}


def _pointers(jit_fn, dtype: str) -> dict:
    types = {"h_ptr": dtype, "w_ptr": dtype, "b_ptr": dtype, "dlogits_ptr": dtype, "tgt_ptr": "*i64",
             "part_arg_ptr": "*i32"}  # fmt: skip
    return {name: types.get(name, "*fp32") for name in jit_fn.arg_names if name.endswith("_ptr")}


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


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _mma_loop_facts(ttgir: str) -> dict:
    """The loop that holds the MMAs: does it also hold the tile's epilogue (a flat tiles x K loop, "flat"), is the
    pipeline drained inside it (an `async_wait {num = 0}`: every load in flight waited for, "drains_in_loop"), and
    are the async copies of later steps issued before the epilogue's first exp ("prefetch_before_epilogue")?"""
    lines = ttgir.splitlines()
    mma = next((i for i, line in enumerate(lines) if re.search(r"ttng\.warp_group_dot |tt\.dot ", line)), None)
    if mma is None:
        return {}
    start = next(i for i in range(mma, -1, -1) if "scf.for" in lines[i] and _indent(lines[i]) < _indent(lines[mma]))
    end = next(i for i in range(start + 1, len(lines)) if _indent(lines[i]) <= _indent(lines[start]))
    body = lines[start + 1 : end]
    copies = [i for i, line in enumerate(body) if "async_copy_global_to_local" in line]
    exps = [i for i, line in enumerate(body) if "math.exp" in line]
    return {
        "flat": bool(exps),
        "drains_in_loop": any(re.search(r"ttg\.async_wait\b.*\{num = 0 ", line) for line in body),
        "prefetch_before_epilogue": bool(copies and exps) and copies[-1] < exps[0],
        "persistent": "tt.get_num_programs" in ttgir,
    }


def compile_variant(jit_fn, pointers: dict, constexprs: dict, multiples_of_16: tuple, warps: int, stages: int):
    names = jit_fn.arg_names
    defaults = {p.name: p.default for p in jit_fn.params if p.is_constexpr and p.has_default}
    constexprs = {**defaults, **constexprs}
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
            **_mma_loop_facts(ttgir), **_registers(ptx)}  # fmt: skip


def _label(config: triton.Config) -> str:
    kw = config.kwargs
    slices = kw.get("V_SLICES", 1)
    width = f"{slices}x{kw['BLOCK_V']}" if slices > 1 else f"{kw['BLOCK_V']}"
    return f"{kw['BLOCK_N']}x{width}x{kw['BLOCK_K']}-w{config.num_warps}-s{config.num_stages}"


def _matmul_variants():
    """(kernel, role, config, dtype, flags name, flags): the pinned tiles under every flag set that changes their
    registers, and each autotune candidate under the heaviest flags it is tried with."""
    for dtype, pinned in (("*bf16", flp.PINNED_16BIT), ("*fp32", flp.PINNED_FP32)):
        for name, flags in FWD_FLAG_SETS.items():
            yield "fwd", "pinned", pinned, dtype, name, {**dict.fromkeys(STAT_FLAGS, False), **flags}
        yield "bwd", "pinned", pinned, dtype, "both-grads", BWD_FLAGS
    for dtype, group in (("*bf16", "16bit"), ("*fp32", "fp32")):
        for config in flp.CANDIDATE_TILES[group][1:]:
            yield "fwd", "candidate", config, dtype, "all-stats", dict.fromkeys(STAT_FLAGS, True)
            yield "bwd", "candidate", config, dtype, "both-grads", BWD_FLAGS
    yield "fwd", "candidate", flp.WIDE_16BIT, "*bf16", "logprob", dict.fromkeys(STAT_FLAGS, False)


def main():
    kernels = {"fwd": flp._fused_linear_logprob_fwd_kernel, "bwd": flp._fused_linear_logprob_bwd_kernel}
    aligned = {"fwd": ("K", "stride_hn", "stride_wv", "split_v"), "bwd": ("K", "stride_hn", "stride_wv", "stride_dn")}
    for kernel, role, config, dtype, flags_name, flags in _matmul_variants():
        jit_fn = kernels[kernel]
        constexprs = {**config.kwargs, **flags, "HAS_BIAS": False, "SCALED": False, "EVEN_K": True,
                      "PRECISION": "ieee" if dtype == "*fp32" else "tf32", "stride_hk": 1, "stride_wk": 1}  # fmt: skip
        report = compile_variant(jit_fn, _pointers(jit_fn, dtype), constexprs, aligned[kernel], config.num_warps,
                                 config.num_stages)  # fmt: skip
        print(json.dumps({"kernel": kernel, "role": role, "tile": _label(config), "dtype": dtype[1:],
                          "flags": flags_name, **report}), flush=True)  # fmt: skip
    # selective_log_softmax: memory-bound, so what matters is 16-byte loads of the bf16 logits
    for name, jit_fn, consts in (
        ("selective_fwd", sls._selective_log_softmax_fwd_kernel,
         {"SCALED": False, "HAS_ENTROPY": True, "BLOCK_V": 4096}),
        ("selective_bwd", sls._selective_log_softmax_bwd_kernel,
         {"SCALED": False, "HAS_GRAD_LOGPROB": True, "HAS_GRAD_ENTROPY": True, "BLOCK_V": 2048}),
    ):  # fmt: skip
        pointers = {n: ("*bf16" if n in ("logits_ptr", "grad_logits_ptr") else "*i64" if n == "tgt_ptr" else "*fp32")
                    for n in jit_fn.arg_names if n.endswith("_ptr")}  # fmt: skip
        report = compile_variant(jit_fn, pointers, consts, ("V", "stride_row", "stride_grad_row"), 8, 3)
        print(json.dumps({"kernel": name, "role": "pinned", "tile": "row", "dtype": "bf16", "flags": "entropy",
                          **report}), flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
