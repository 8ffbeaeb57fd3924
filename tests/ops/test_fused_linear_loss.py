"""fused_linear_loss against float64 autograd through fused_linear_logprob_ref plus the same loss_fn summed over the
same chunks: the loss, every gradient and the per-token outputs, for both implementations."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testing_utils import assert_fa_close, leaves_like, lm_head_inputs, max_error

from posttrain.ops import FusedLoss, LossChunk, fused_linear_logprob_ref, fused_linear_loss, row_chunks
from posttrain.ops.fused_linear_logprob import STATS

IMPLS = ["torch", "triton"]


# --- loss functions, as trainers would write them: captured per-row data indexed by chunk.rows ----------------------


def _sequences(targets, n_seqs):
    """Consecutive sequences of about equal length: each row's sequence id, and each row's validity."""
    n = targets.shape[0]
    return torch.arange(n) * n_seqs // max(n, 1), targets != -100


def sft_nll(targets):
    n_tokens = (targets != -100).sum().clamp(min=1)  # the global normalizer, given up front

    def loss_fn(c):
        return -c.logprobs.sum() / n_tokens

    return loss_fn


def grpo_like(targets, eps=0.2):
    """Clipped importance ratio per token, averaged within each sequence (using the chunk's rows: chunks hold whole
    sequences), then over sequences."""
    n = targets.shape[0]
    n_seqs = max(1, n // 6)
    seq_ids, valid = _sequences(targets, n_seqs)
    advantages = torch.randn(n_seqs)[seq_ids]
    log_ratio_shift = (torch.rand(n) - 0.5) * 0.6  # old log-probs = current ones - shift: ratios straddle the clip

    def loss_fn(c):
        dtype = c.logprobs.dtype
        ratio = torch.exp(c.logprobs - c.logprobs.detach() + log_ratio_shift[c.rows].to(dtype))
        adv = advantages[c.rows].to(dtype)
        per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv) * valid[c.rows]
        sid = seq_ids[c.rows]
        sums = torch.zeros(n_seqs, dtype=dtype).index_add(0, sid, per_token)
        counts = torch.zeros(n_seqs, dtype=dtype).index_add(0, sid, valid[c.rows].to(dtype))
        return (sums / counts.clamp(min=1)).sum() / n_seqs

    return loss_fn, seq_ids


def dpo_like(targets, beta=0.3):
    """Sequences 2k (chosen) and 2k + 1 (rejected) form pair k; a chunk holds whole pairs."""
    n = targets.shape[0]
    n_seqs = 2 * max(1, n // 12)
    seq_ids, valid = _sequences(targets, n_seqs)
    ref_logps = torch.randn(n_seqs) * 3

    def loss_fn(c):
        dtype = c.logprobs.dtype
        sid = seq_ids[c.rows]
        seq_logps = torch.zeros(n_seqs, dtype=dtype).index_add(0, sid, c.logprobs * valid[c.rows])
        pairs = torch.unique(sid // 2)
        margin = (seq_logps - ref_logps.to(dtype))[2 * pairs] - (seq_logps - ref_logps.to(dtype))[2 * pairs + 1]
        return -torch.nn.functional.logsigmoid(beta * margin).sum() / (n_seqs // 2)

    return loss_fn, seq_ids // 2


def with_entropy_bonus(targets):
    n_tokens = (targets != -100).sum().clamp(min=1)

    def loss_fn(c):
        return (-c.logprobs.sum() - 0.1 * c.entropy.sum()) / n_tokens

    return loss_fn


def stats_weighted(targets):
    n_tokens = (targets != -100).sum().clamp(min=1)

    def loss_fn(c):
        assert not (c.mean_logit.requires_grad or c.log_sum_sq_probs.requires_grad)
        weights = torch.sigmoid(c.mean_logit) * torch.exp(c.log_sum_sq_probs) * (1 + c.is_argmax.to(c.logprobs.dtype))
        return -(weights * c.logprobs).sum() / n_tokens

    return loss_fn


def _loss_case(name, targets):
    """(loss_fn, group ids for row_chunks or None, with_entropy, stats) of a named loss."""
    if name == "sft":
        return sft_nll(targets), None, False, ()
    if name == "grpo":
        return *grpo_like(targets), False, ()
    if name == "dpo":
        return *dpo_like(targets), False, ()
    if name == "entropy":
        return with_entropy_bonus(targets), None, True, ()
    return stats_weighted(targets), None, False, STATS


# --- the oracle and the comparison ------------------------------------------------------------------------------------


def oracle(hidden, weight, bias, targets, loss_fn, chunks, *, temperature=1.0, with_entropy=False, stats=()):
    """Autograd through fused_linear_logprob_ref (at the leaves' dtype) and loss_fn over the chunks: (loss, logprobs,
    entropy, d_hidden, d_weight, d_bias)."""
    outs = list(fused_linear_logprob_ref(
        hidden, weight, targets, bias=bias, temperature=temperature, return_entropy=True, stats=STATS
    ))  # fmt: skip
    logprobs, entropy = outs[0], outs[1]
    by_name = {name: value.detach() if name in stats else None for name, value in zip(STATS, outs[2:])}
    chunks = chunks if chunks is not None else [torch.arange(hidden.shape[0])]
    loss = sum(
        loss_fn(LossChunk(rows, logprobs[rows], entropy[rows] if with_entropy else None,
                          *(by_name[name][rows] if by_name[name] is not None else None for name in STATS)))
        for rows in chunks
    )  # fmt: skip
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    return [loss, logprobs, entropy, *grads]


def run(impl, hidden, weight, bias, targets, loss_fn, chunks, *, grad_scale=1.0, **kwargs):
    out = fused_linear_loss(hidden, weight, targets, loss_fn, chunks=chunks, bias=bias, impl=impl, **kwargs)
    values = torch.promote_types(hidden.dtype, torch.float32)  # float64 only on the torch path
    assert isinstance(out, FusedLoss) and out.loss.dtype == values and out.loss.dim() == 0
    assert out.logprobs.dtype == values and not out.logprobs.requires_grad
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    grads = torch.autograd.grad(out.loss * grad_scale, leaves)
    return [out.loss, out.logprobs, out.entropy, *grads], out


NAMES = ["loss", "logprobs", "entropy", "d_hidden", "d_weight", "d_bias"]


def check(impl, n, h, v, loss_name, *, dtype=torch.float32, bias=False, temperature=1.0, logit_scale=1.0,
          ignore_frac=0.0, max_rows=None, factor=2.0):  # fmt: skip
    """`impl` at `dtype` against the same math in float64 on the same (`dtype`-rounded) inputs, with the oracle at
    `dtype` as the error baseline (FlashAttention's criterion). Returns {name: (error, baseline error)}."""
    inputs = lm_head_inputs(n, h, v, dtype=dtype, bias=bias, logit_scale=logit_scale, ignore_frac=ignore_frac)
    targets = inputs[3]
    loss_fn, groups, with_entropy, stats = _loss_case(loss_name, targets)
    chunks = row_chunks(groups, max_rows or n) if groups is not None else None
    kwargs = {"temperature": temperature, "with_entropy": with_entropy, "stats": stats}
    exact = oracle(*leaves_like(inputs[:3], torch.float64), targets, loss_fn, chunks, **kwargs)
    baseline = oracle(*leaves_like(inputs[:3], dtype), targets, loss_fn, chunks, **kwargs)
    actual, out = run(impl, *leaves_like(inputs[:3], dtype), targets, loss_fn, chunks, **kwargs)
    errors = {}
    for name, a, e, b in zip(NAMES, actual, exact, baseline):  # d_bias only with bias
        if name == "entropy" and not with_entropy:
            assert a is None
            continue
        assert a.shape == e.shape, name
        if name.startswith("d_"):
            assert a.dtype == dtype, f"{name} came back as {a.dtype}, not the input dtype {dtype}"
        assert torch.isfinite(a).all(), name
        assert_fa_close(a, e, b, name=name, factor=factor)
        errors[name] = (max_error(a, e), max_error(b, e))
    for name in STATS:
        assert (getattr(out, name) is None) == (name not in stats), name
    return errors


SHAPES = [
    pytest.param(1, 16, 1000, id="N1-H16-V1000"),
    pytest.param(37, 48, 1000, id="N37-H48-V1000"),
    pytest.param(45, 33, 4099, id="N45-H33-V4099"),
]
LOSSES = ["sft", "grpo", "dpo", "entropy", "stats"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("n,h,v", SHAPES)
def test_matches_fp64(impl, loss_name, n, h, v):
    bias = loss_name in ("grpo", "stats")
    check(impl, n, h, v, loss_name, bias=bias, temperature=0.7 if bias else 1.0, ignore_frac=0.2, max_rows=20)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [0.3, 2.5])
def test_temperature_and_bias(impl, temperature):
    check(impl, 29, 40, 3000, "entropy", bias=True, temperature=temperature, logit_scale=3.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_logits(impl):
    check(impl, 33, 32, 2000, "entropy", bias=True, logit_scale=1e3)


def test_fp16_error_within_twice_torch():
    check("triton", 37, 64, 1000, "grpo", dtype=torch.float16, bias=True, temperature=0.8, ignore_frac=0.1, max_rows=16)
    check("triton", 37, 64, 1000, "entropy", dtype=torch.float16, bias=True, logit_scale=4.0)


def test_fp16_torch_path_matches_fp64():
    check("torch", 37, 64, 1000, "entropy", dtype=torch.float16, bias=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_chunking_does_not_change_the_result(impl):
    hidden, weight, bias, targets = lm_head_inputs(41, 24, 1500, bias=True, ignore_frac=0.2)
    loss_fn = with_entropy_bonus(targets)
    perm = torch.randperm(41)
    partitions = {
        "one": [torch.arange(41)],
        "bytes": None,
        "rows7": row_chunks(torch.arange(41), 7),
        "shuffled": list(perm.split([5, 20, 1, 15])),
    }
    results = {}
    for name, chunks in partitions.items():
        leaves = leaves_like((hidden, weight, bias), torch.float32)
        # max_chunk_bytes of 9 rows of fp32 logits: the "bytes" partition has 5 chunks
        results[name] = run(impl, *leaves, targets, loss_fn, chunks, with_entropy=True,
                            max_chunk_bytes=9 * 1500 * 4)[0]  # fmt: skip
    for name, result in results.items():
        for field, a, b in zip(NAMES, result, results["one"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name}: {field}")


@pytest.mark.parametrize("impl", IMPLS)
def test_ignored_rows_get_zero_and_no_gradient(impl):
    hidden, weight, _, targets = lm_head_inputs(41, 32, 2000, ignore_frac=0.4)
    ignored = targets == -100
    assert ignored.any() and (~ignored).any()

    def loss_fn(c):  # nonzero gradient into every row, ignored ones included
        return -(c.logprobs + c.entropy).sum()

    out = fused_linear_loss(hidden, weight, targets, loss_fn, with_entropy=True, impl=impl)
    assert (out.logprobs[ignored] == 0).all() and (out.entropy[ignored] == 0).all()
    assert (out.logprobs[~ignored] < 0).all() and (out.entropy[~ignored] > 0).all()
    out.loss.backward()
    assert (hidden.grad[ignored] == 0).all()
    assert hidden.grad[~ignored].abs().sum(-1).gt(0).all()
    every = fused_linear_loss(hidden, weight, torch.full_like(targets, -100), loss_fn, with_entropy=True, impl=impl)
    assert every.loss.item() == 0
    assert all((g == 0).all() for g in torch.autograd.grad(every.loss, (hidden, weight)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_backward_scales_by_grad_output(impl, dtype):
    hidden, weight, bias, targets = leaves_like(lm_head_inputs(23, 32, 900, bias=True)[:3], dtype) + (
        lm_head_inputs(23, 32, 900)[3],
    )
    loss_fn = sft_nll(targets)
    chunks = row_chunks(torch.arange(23) // 4, 8)
    unit, _ = run(impl, hidden, weight, bias, targets, loss_fn, chunks)
    scaled, _ = run(impl, hidden, weight, bias, targets, loss_fn, chunks, grad_scale=0.37)
    for name, a, b in zip(NAMES[3:], scaled[3:], unit[3:]):
        # the fp32 product with grad_output, rounded once (torch's own fp16 * fp32 0-dim tensor rounds 0.37 to fp16)
        assert torch.equal(a, (b.float() * torch.tensor(0.37)).to(dtype)), name


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_weight_or_hidden_gets_no_gradient_work(impl):
    hidden, weight, bias, targets = lm_head_inputs(30, 24, 800, bias=True)
    frozen = weight.detach()
    loss_fn = with_entropy_bonus(targets)
    out = fused_linear_loss(hidden, frozen, targets, loss_fn, bias=bias, with_entropy=True, impl=impl)
    d_hidden_saved, d_weight_saved, _ = out.loss.grad_fn.saved_tensors
    assert d_weight_saved is None and d_hidden_saved is not None
    d_hidden, d_bias = torch.autograd.grad(out.loss, (hidden, bias))
    exact = oracle(*leaves_like((hidden, weight, bias), torch.float64), targets, loss_fn, None, with_entropy=True)
    torch.testing.assert_close(d_hidden.double(), exact[3], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(d_bias.double(), exact[5], rtol=1e-4, atol=1e-6)
    out = fused_linear_loss(hidden.detach(), weight, targets, loss_fn, with_entropy=True, impl=impl)
    assert out.loss.grad_fn.saved_tensors[0] is None  # no dH for a hidden that needs none
    (d_weight,) = torch.autograd.grad(out.loss, weight)
    exact = oracle(*leaves_like((hidden, weight), torch.float64), None, targets, loss_fn, None, with_entropy=True)
    torch.testing.assert_close(d_weight.double(), exact[4], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad_call_computes_the_loss_only(impl):
    hidden, weight, _, targets = lm_head_inputs(25, 16, 700)
    seen = []

    def loss_fn(c):
        seen.append(c.logprobs.requires_grad)
        return -c.logprobs.sum()

    with torch.no_grad():
        out = fused_linear_loss(hidden, weight, targets, loss_fn, impl=impl)
    plain = fused_linear_loss(hidden.detach(), weight.detach(), targets, loss_fn, impl=impl)
    assert not out.loss.requires_grad and not plain.loss.requires_grad and seen == [False, False]
    expected = -fused_linear_logprob_ref(hidden.detach().double(), weight.detach().double(), targets)[0].sum()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain.loss, out.loss)


@pytest.mark.parametrize("impl", IMPLS)
def test_loss_fn_without_dependence_or_without_entropy(impl):
    hidden, weight, _, targets = lm_head_inputs(20, 16, 600)
    chunks = row_chunks(torch.arange(20) // 5, 10)
    constant = fused_linear_loss(hidden, weight, targets, lambda c: torch.tensor(0.5), chunks=chunks, impl=impl)
    assert constant.loss.item() == 1.0  # two chunks
    d_hidden, d_weight = torch.autograd.grad(constant.loss, (hidden, weight))
    assert (d_hidden == 0).all() and (d_weight == 0).all()
    # entropy computed and returned, but the loss only uses the log-probs: no entropy gradient reaches the op
    out = fused_linear_loss(hidden, weight, targets, sft_nll(targets), with_entropy=True, impl=impl)
    assert out.entropy is not None and (out.entropy > 0).all()
    (d_hidden,) = torch.autograd.grad(out.loss, hidden)
    exact = oracle(*leaves_like((hidden, weight), torch.float64), None, targets, sft_nll(targets), None)
    torch.testing.assert_close(d_hidden.double(), exact[3], rtol=1e-4, atol=1e-7)


def test_non_contiguous_inputs():
    hidden, weight, bias, targets = lm_head_inputs(40, 32, 1200, bias=True)
    hidden_t = hidden.detach().t().contiguous().t().requires_grad_()  # column-major [N, H]
    weight_t = weight.detach().t().contiguous().t().requires_grad_()
    assert not hidden_t.is_contiguous() and not weight_t.is_contiguous()
    loss_fn = with_entropy_bonus(targets)
    chunks = row_chunks(torch.arange(40) // 3, 12)
    actual, _ = run("triton", hidden_t, weight_t, bias, targets, loss_fn, chunks, with_entropy=True)
    expected, _ = run("torch", *leaves_like((hidden, weight, bias), torch.float32), targets, loss_fn, chunks,
                      with_entropy=True)  # fmt: skip
    for name, a, b in zip(NAMES, actual, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_stats_and_outputs_in_row_order():
    hidden, weight, bias, targets = lm_head_inputs(50, 32, 600, bias=True, logit_scale=4.0, ignore_frac=0.2)
    logits = (hidden @ weight.T + bias).detach()
    targets[:10] = torch.where(targets[:10] == -100, -100, logits[:10].argmax(-1))  # some targets are the argmax
    chunks = list(torch.randperm(50).split([17, 33]))
    out = fused_linear_loss(hidden, weight, targets, stats_weighted(targets), chunks=chunks, bias=bias,
                            temperature=0.5, stats=STATS, impl="triton")  # fmt: skip
    ref = fused_linear_logprob_ref(hidden.double(), weight.double(), targets, bias=bias.double(), temperature=0.5,
                                   stats=STATS)  # fmt: skip
    assert out.is_argmax.dtype == torch.bool and out.is_argmax.any() and not out.is_argmax.all()
    assert torch.equal(out.is_argmax, ref[2])
    for name, a, b in zip(["logprobs", "mean_logit", "log_sum_sq_probs"], (out.logprobs, out[3], out[5]),
                          (ref[0], ref[1], ref[3])):  # fmt: skip
        torch.testing.assert_close(a.double(), b.detach(), rtol=1e-5, atol=1e-5, msg=name)


def test_float64_runs_the_torch_path_exactly():
    hidden, weight, bias, targets = lm_head_inputs(19, 16, 500, dtype=torch.float64, bias=True, ignore_frac=0.2)
    loss_fn, groups = grpo_like(targets)
    chunks = row_chunks(groups, 8)
    actual, _ = run("auto", hidden, weight, bias, targets, loss_fn, chunks)
    exact = oracle(hidden, weight, bias, targets, loss_fn, chunks)
    for name, a, e in zip(NAMES, actual, exact):
        if name != "entropy":
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=name)


def test_autocast_gradients_in_the_parameters_dtype():
    hidden, weight, _, targets = lm_head_inputs(16, 32, 500)
    with torch.autocast(hidden.device.type, dtype=torch.float16):
        out = fused_linear_loss(hidden, weight, targets, sft_nll(targets), impl="triton")
    grads = torch.autograd.grad(out.loss, (hidden, weight))
    assert all(g.dtype == torch.float32 for g in grads)
    # what autocast's F.linear sees: the fp16-rounded inputs
    rounded = [t.detach().half().double().requires_grad_() for t in (hidden, weight)]
    exact = oracle(*rounded, None, targets, sft_nll(targets), None)
    baseline = oracle(*leaves_like((hidden, weight), torch.float16), None, targets, sft_nll(targets), None)
    for name, g, e, b in zip(["d_hidden", "d_weight"], grads, exact[3:], baseline[3:]):
        assert_fa_close(g, e, b, name=name)


def test_empty_input():
    hidden, weight, _, _ = lm_head_inputs(4, 16, 100)
    out = fused_linear_loss(hidden[:0], weight, torch.zeros(0, dtype=torch.long), lambda c: -c.logprobs.sum())
    assert out.loss.item() == 0 and out.logprobs.shape == (0,)
    (d_weight,) = torch.autograd.grad(out.loss, weight)
    assert (d_weight == 0).all()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 30),
    h=st.integers(1, 40),
    v=st.integers(2, 1500),
    bias=st.booleans(),
    temperature=st.floats(0.25, 4.0),
    num_chunks=st.integers(1, 4),
    seed=st.integers(0, 2**31),
)
def test_property_random_shapes(n, h, v, bias, temperature, num_chunks, seed):
    torch.manual_seed(seed)  # the tensors too come from hypothesis' draw, so a failure replays
    inputs = lm_head_inputs(n, h, v, dtype=torch.float64, bias=bias, ignore_frac=0.2)
    targets = inputs[3]
    weights = torch.randn(n)

    def loss_fn(c):
        return (weights[c.rows].to(c.logprobs.dtype) * (c.logprobs - 0.3 * c.entropy)).sum()

    sizes = [len(part) for part in torch.arange(n).tensor_split(num_chunks) if len(part)]
    chunks = list(torch.randperm(n).split(sizes))
    kwargs = {"temperature": temperature, "with_entropy": True}
    exact = oracle(*inputs, loss_fn, chunks, **kwargs)
    baseline = oracle(*leaves_like(inputs[:3], torch.float32), targets, loss_fn, chunks, **kwargs)
    actual, _ = run("triton", *leaves_like(inputs[:3], torch.float32), targets, loss_fn, chunks, **kwargs)
    for name, a, e, b in zip(NAMES, actual, exact, baseline):
        if e is not None:
            assert_fa_close(a, e, b, name=name)


# --- row_chunks -------------------------------------------------------------------------------------------------------


def _assert_partition(chunks, n):
    assert sorted(torch.cat(chunks).tolist()) == list(range(n))


def test_row_chunks_packs_consecutive_groups():
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 3, 4])
    chunks = row_chunks(groups, max_rows=5)
    assert [c.tolist() for c in chunks] == [[0, 1, 2, 3, 4], [5], [6, 7, 8, 9, 10], [11]]
    assert all(c.dtype == torch.int64 for c in chunks)


def test_row_chunks_keeps_interleaved_groups_together():
    groups = torch.tensor([2, 0, 1, 0, 2, 1, 1, 0])
    chunks = row_chunks(groups, max_rows=4)
    _assert_partition(chunks, 8)
    for chunk in chunks:
        for group in groups[chunk].unique():
            assert set((groups == group).nonzero().flatten().tolist()) <= set(chunk.tolist())
        assert len(chunk) <= 4


def test_row_chunks_gives_a_large_group_its_own_chunk():
    groups = torch.tensor([0, 1, 1, 1, 1, 1, 1, 2])
    assert [c.tolist() for c in row_chunks(groups, max_rows=3)] == [[0], [1, 2, 3, 4, 5, 6], [7]]
    assert row_chunks(torch.zeros(0, dtype=torch.long), 4) == []


@pytest.mark.parametrize(
    "groups, max_rows, error, match",
    [
        (torch.zeros(3), 2, TypeError, "group_ids must be a 1-D integer tensor"),
        (torch.zeros(2, 2, dtype=torch.long), 2, TypeError, "group_ids must be a 1-D integer tensor"),
        (torch.zeros(3, dtype=torch.long), 0, ValueError, "max_rows must be an int >= 1, got 0"),
    ],
    ids=["float-ids", "2d-ids", "zero-rows"],
)
def test_row_chunks_errors(groups, max_rows, error, match):
    with pytest.raises(error, match=match):
        row_chunks(groups, max_rows)


# --- argument errors --------------------------------------------------------------------------------------------------


def _call(**change):
    hidden, weight, _, targets = lm_head_inputs(6, 16, 100)
    args = {"hidden": hidden, "weight": weight, "targets": targets, "loss_fn": lambda c: -c.logprobs.sum()}
    args.update(change)
    hidden, weight, targets, loss_fn = (args.pop(k) for k in ("hidden", "weight", "targets", "loss_fn"))
    return fused_linear_loss(hidden, weight, targets, loss_fn, **args)


def _idx(*values):
    return torch.tensor(values, dtype=torch.long)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"chunks": [_idx(0, 1, 2), _idx(3, 4)]}, ValueError, "partition the 6 rows of hidden, but .* sum to 5"),
        ({"chunks": [_idx(0, 1, 2), _idx(2, 4, 5)]}, ValueError, r"row 2 appears more than once, row 3 in none"),
        ({"chunks": [_idx(0, 1, 2), _idx(3, 4, 6)]}, ValueError, r"chunks\[1\] holds row 6, outside \[0, 6\)"),
        ({"chunks": [_idx(0, 1, 2, 3, 4, 5), _idx()]}, ValueError, r"chunks\[1\] is empty"),
        ({"chunks": [torch.arange(6.0)]}, TypeError, r"chunks\[0\] must be a 1-D int64 tensor"),
        ({"chunks": torch.arange(6)}, TypeError, "chunks must be a list of 1-D int64 tensors"),
        ({"loss_fn": lambda c: -c.logprobs}, TypeError, r"loss_fn must return a floating-point scalar .* shape \(6,\)"),
        ({"loss_fn": lambda c: "nll"}, TypeError, "loss_fn must return a floating-point scalar .* got str"),
        ({"loss_fn": "nll"}, TypeError, "loss_fn must be callable"),
        ({"stats": ("entropy",)}, ValueError, "stats .* must be a tuple of names among: mean_logit"),
        ({"max_chunk_bytes": 0}, ValueError, "max_chunk_bytes must be a positive int, got 0"),
        ({"hidden": torch.randn(2, 3, 16)}, ValueError, r"hidden must be 2-D \[N, H\]"),
        ({"temperature": -1.0}, ValueError, "temperature must be"),
        ({"targets": _idx(0, 1, 2, 3, 4, 100)}, ValueError, r"= 100 is outside \[0, 100\)"),
        ({"impl": "cuda"}, ValueError, "impl 'cuda' is not one of"),
    ],
    ids=["sizes", "repeated-row", "row-out-of-range", "empty-chunk", "float-chunk", "tensor-chunks",
         "vector-loss", "string-loss", "loss-fn-not-callable", "bad-stat", "zero-bytes", "3d-hidden",
         "negative-temperature", "bad-target", "bad-impl"],
)  # fmt: skip
def test_bad_argument_errors(change, error, match):
    if "hidden" in change:
        change["targets"] = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(error, match=match):
        _call(**change)


# --- GPU: bfloat16 (the interpreter's bf16 is broken) -----------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("loss_name", ["grpo", "entropy", "dpo"])
@pytest.mark.parametrize("n,h,v", [(37, 896, 50257), (2048, 1024, 151936)], ids=["N37-V50257", "N2048-V151936"])
def test_gpu_bf16_matches_fp64(loss_name, n, h, v):
    check("triton", n, h, v, loss_name, dtype=torch.bfloat16, bias=True, temperature=0.9, ignore_frac=0.1,
          max_rows=512)  # fmt: skip


@pytest.mark.gpu
def test_gpu_bf16_grad_output_scaling_rounds_once():
    hidden, weight, _, targets = lm_head_inputs(300, 256, 32000, dtype=torch.bfloat16)
    unit, _ = run("triton", hidden, weight, None, targets, sft_nll(targets), None, max_chunk_bytes=2**22)
    scaled, _ = run("triton", hidden, weight, None, targets, sft_nll(targets), None, max_chunk_bytes=2**22,
                    grad_scale=1 / 3)  # fmt: skip
    for a, b in zip(scaled[3:5], unit[3:5]):
        # the saved gradient is bf16; scaling happens in fp32 and rounds once (torch would round 1/3 to bf16 first)
        assert torch.equal(a, (b.float() * torch.tensor(1 / 3)).to(torch.bfloat16))
