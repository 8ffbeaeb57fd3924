"""The launchers' internal tilings (vocabulary splits, backward chunks) must not change the numbers."""

import pytest
import torch
from testing_utils import lm_head_inputs

from posttrain.kernels.fused_linear_logprob import fused_linear_logprob_bwd, fused_linear_logprob_fwd
from posttrain.ops import fused_linear_logprob
from posttrain.ops.fused_linear_logprob import STATS


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
