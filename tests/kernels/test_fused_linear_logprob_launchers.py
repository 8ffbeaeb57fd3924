"""The launchers' internal tilings (vocabulary splits, backward chunks, the persistent grid's size, the tile) must not
change the numbers; the launch itself: one program per SM, pinned tiles, the autotune switch and its key."""

import inspect

import pytest
import torch
import triton
import triton.language as tl
from testing_utils import lm_head_inputs

from posttrain.kernels import _common
import posttrain.kernels.fused_linear_logprob as flp
from posttrain.kernels.fused_linear_logprob import fused_linear_logprob_bwd, fused_linear_logprob_fwd
from posttrain.ops import fused_linear_logprob
from posttrain.ops.fused_linear_logprob import STATS

# CPU tensors at the interpreter's tile: on a CUDA machine the launchers would compile for the GPU instead
pytestmark = pytest.mark.skipif(not _common.interpreting(), reason="runs the kernels in Triton's interpreter")


def _forward(hidden, weight, bias, targets, split_v):
    return fused_linear_logprob_fwd(hidden, weight, bias, targets, 0.8, -100, True, STATS, split_v=split_v)


@pytest.mark.parametrize("split_v", [300, 1000, 2900], ids=lambda s: f"split{s}")
def test_vocabulary_splits_agree(split_v):
    hidden, weight, bias, targets = (t.detach() if t.is_floating_point() else t for t in lm_head_inputs(
        45, 32, 2900, bias=True, ignore_frac=0.2, logit_scale=5.0))  # fmt: skip
    one = _forward(hidden, weight, bias, targets, split_v=4096)
    many = _forward(hidden, weight, bias, targets, split_v=split_v)
    for key in ("logprob", "entropy", "mean_logit", "log_sum_sq_probs", "lse"):
        torch.testing.assert_close(many[key], one[key], rtol=1e-5, atol=1e-5, msg=key)
    assert torch.equal(many["is_argmax"], one["is_argmax"])


@pytest.mark.parametrize(
    "chunk_bytes", [45 * 1024 * 4, 20 * 1024 * 4], ids=["column-chunks", "row-and-column-chunks"]
)  # fmt: skip
def test_backward_chunks_agree(chunk_bytes):
    n, v = 45, 2500
    hidden, weight, bias, targets = (t.detach() if t.is_floating_point() else t for t in lm_head_inputs(
        n, 40, v, bias=True, ignore_frac=0.2))  # fmt: skip
    fwd = _forward(hidden, weight, bias, targets, split_v=4096)
    g_lp, g_ent = torch.randn(n), torch.randn(n)
    args = (hidden, weight, bias, targets, fwd["lse"], fwd["entropy"], g_lp, g_ent, 0.8, -100, (True,) * 3)
    whole = fused_linear_logprob_bwd(*args)
    chunked = fused_linear_logprob_bwd(*args, chunk_bytes=chunk_bytes)
    for name, a, b in zip(["d_hidden", "d_weight", "d_bias"], chunked, whole):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_chunked_backward_matches_reference_in_fp16():
    # fp16 inputs, several column chunks: dH is summed over chunks in fp32, then rounded once
    n, v = 33, 3000
    hidden, weight, _, targets = lm_head_inputs(n, 64, v, dtype=torch.float16)
    fwd = fused_linear_logprob_fwd(hidden.detach(), weight.detach(), None, targets, 1.0, -100, False)
    g = torch.randn(n)
    d_hidden, d_weight, _ = fused_linear_logprob_bwd(
        hidden.detach(), weight.detach(), None, targets, fwd["lse"], None, g, None, 1.0, -100, (True, True, False),
        chunk_bytes=n * 1024 * 2,
    )  # fmt: skip
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = fused_linear_logprob(h64, w64, targets, impl="torch")
    r_hidden, r_weight = torch.autograd.grad(ref, (h64, w64), g.double())
    assert d_hidden.dtype == torch.float16 and d_weight.dtype == torch.float16
    torch.testing.assert_close(d_hidden.double(), r_hidden, rtol=1e-2, atol=2e-3)
    torch.testing.assert_close(d_weight.double(), r_weight, rtol=1e-2, atol=2e-3)


def _inputs(n=45, h=40, v=2500):
    return tuple(t.detach() if t is not None and t.is_floating_point() else t for t in lm_head_inputs(
        n, h, v, bias=True, ignore_frac=0.2, logit_scale=3.0))  # fmt: skip


@pytest.mark.parametrize("programs", [1, 2, 7, 40], ids=lambda p: f"{p}-programs")
def test_persistent_grid_size_does_not_change_the_numbers(programs):
    # each tile's arithmetic is the same whichever program runs it: the results are bit-identical
    hidden, weight, bias, targets = _inputs()
    ref = fused_linear_logprob_fwd(hidden, weight, bias, targets, 0.8, -100, True, STATS, split_v=768)
    out = fused_linear_logprob_fwd(hidden, weight, bias, targets, 0.8, -100, True, STATS, split_v=768,
                                   num_programs=programs)  # fmt: skip
    for key in ("logprob", "entropy", "mean_logit", "is_argmax", "log_sum_sq_probs", "lse"):
        assert torch.equal(out[key], ref[key]), key
    g_lp, g_ent = torch.randn(hidden.shape[0]), torch.randn(hidden.shape[0])
    args = (hidden, weight, bias, targets, ref["lse"], ref["entropy"], g_lp, g_ent, 0.8, -100, (True,) * 3)
    for a, b in zip(fused_linear_logprob_bwd(*args, num_programs=programs), fused_linear_logprob_bwd(*args)):
        assert torch.equal(a, b)


def test_wide_tile_with_two_vocabulary_slices():
    # the 128x256-style forward tile (two MMAs per hidden slice, the epilogue one slice at a time), at interpreter size
    wide = flp._tile(16, 128, 32, 4, 1, group=2, V_SLICES=2)
    hidden, weight, bias, targets = _inputs(v=2900)
    ref = fused_linear_logprob_fwd(hidden, weight, bias, targets, 0.8, -100, True, STATS, split_v=1000)
    out = fused_linear_logprob_fwd(hidden, weight, bias, targets, 0.8, -100, True, STATS, split_v=1000, config=wide)
    for key in ("logprob", "entropy", "mean_logit", "log_sum_sq_probs", "lse"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-5, msg=key)
    assert torch.equal(out["is_argmax"], ref["is_argmax"])


class _GridSpy:
    """Stands in for a TiledKernel's jit function and records the grid each launch asks for."""

    def __init__(self, fn):
        self.fn, self.arg_names, self.grids = fn, fn.arg_names, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.grids.append(grid(kwargs)[0])
            return self.fn[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("n,expected", [(45, 5), (1, 4)], ids=["one-per-SM", "fewer-items-than-SMs"])
def test_persistent_grid_has_one_program_per_sm(monkeypatch, n, expected):
    monkeypatch.setattr(flp, "persistent_programs", lambda device: 5)  # a 5-SM device
    spies = {}
    for name in ("_fwd", "_bwd"):
        spies[name] = _GridSpy(getattr(flp, name).fn)
        monkeypatch.setattr(getattr(flp, name), "fn", spies[name])
    hidden, weight, bias, targets = _inputs(n=n, v=1000)
    fwd = fused_linear_logprob_fwd(hidden, weight, bias, targets, 1.0, -100, False, split_v=256)
    fused_linear_logprob_bwd(hidden, weight, bias, targets, fwd["lse"], None, torch.randn(n), None, 1.0, -100,
                             (True, True, True))  # fmt: skip
    # forward: cdiv(n, 32) row blocks x 4 splits of 256 columns; backward: cdiv(n, 32) x cdiv(1000, 256) tiles
    assert spies["_fwd"].grids == [expected] and spies["_bwd"].grids == [expected]


def test_default_split_gives_every_program_work():
    assert flp._default_split_v(16384, 151936, 132, 128) == flp.MAX_SPLIT_V
    split_v = flp._default_split_v(1, 151936, 132, 128)
    assert split_v % flp.SPLIT_V_GRANULE == 0 and triton.cdiv(151936, split_v) >= 132


@pytest.mark.parametrize("kernel", ["_fwd", "_bwd"])
def test_autotune_key_holds_every_flag(kernel):
    # a tile tuned for one set of flags must not be reused for another: flags change the registers a tile needs
    tiled = getattr(flp, kernel)
    tile_params = {"BLOCK_N", "BLOCK_V", "BLOCK_K", "GROUP_N", "V_SLICES", *tiled.derived}
    constexprs = {p.name for p in inspect.signature(tiled.fn.fn).parameters.values() if p.annotation is tl.constexpr}
    flags = constexprs - tile_params
    assert flags and flags <= set(tiled.key), flags - set(tiled.key)


@pytest.mark.parametrize(
    "kernel, names",
    [
        (flp._fused_linear_logprob_fwd_kernel, {"N", "N_BUCKET", "num_splits"}),
        (flp._fused_linear_logprob_merge_kernel, {"N", "num_splits"}),
        (flp._fused_linear_logprob_bwd_kernel, {"N", "N_BUCKET", "v_start", "num_cols"}),
    ],
    ids=["fwd", "merge", "bwd"],
)
def test_row_counts_and_offsets_are_not_specialized(kernel, names):
    # N changes every step: specializing on N % 16 or N == 1 would compile the kernels again and again
    if hasattr(kernel, "params"):  # compiled
        assert {p.name for p in kernel.params if p.do_not_specialize} == names
    else:  # interpreted: what the decorator asked for
        assert set(kernel.kwargs["do_not_specialize"]) == names


def test_autotune_switch(monkeypatch):
    # POSTTRAIN_AUTOTUNE=1 wraps the kernels in triton.autotune (pruned to the interpreter's one tile here)
    monkeypatch.setattr(_common, "AUTOTUNE", True)
    tuned = _common.TiledKernel(flp._fused_linear_logprob_fwd_kernel, pinned=flp.pinned_tile, tiles=flp._ALL_TILES,
                                usable=flp._fwd_candidates, key=flp._fwd.key, derived=flp._fwd.derived,
                                dtype_arg="h_ptr")  # fmt: skip
    assert tuned.tuner is not None
    hidden, weight, bias, targets = _inputs()
    ref = fused_linear_logprob_fwd(hidden, weight, bias, targets, 1.0, -100, True, ("is_argmax",))
    monkeypatch.setattr(flp, "_fwd", tuned)
    out = fused_linear_logprob_fwd(hidden, weight, bias, targets, 1.0, -100, True, ("is_argmax",))
    for key in ("logprob", "entropy", "is_argmax", "lse"):
        assert torch.equal(out[key], ref[key]), key


def test_persistent_programs_off_gpu():
    assert _common.persistent_programs(torch.device("cpu")) == _common.INTERPRETER_PROGRAMS
