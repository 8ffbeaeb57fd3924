"""posttrain.ops.rloo_advantages: Triton kernel vs the torch reference vs float64 vs a per-group loop."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.ops.rloo_advantages import rloo_advantages, rloo_advantages_ref

# NaN-aware statistics of all-NaN groups divide 0 by 0 inside the interpreter's numpy
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

SHAPES = [
    pytest.param(2, 2, 1, id="B2-G2-R1"),
    pytest.param(8, 4, 2, id="B8-G4-R2"),
    pytest.param(36, 6, 3, id="B36-G6-R3"),
]
OPTIONS = [
    pytest.param({}, id="plain"),
    pytest.param({"normalize": True}, id="normalize"),
    pytest.param({"reward_clip_range": (-1.0, 1.5)}, id="clip"),
    pytest.param({"beta": 0.05, "with_kl": True}, id="kl"),
    pytest.param({"beta": 0.1, "with_kl": True, "reward_clip_range": (-0.5, 0.5), "normalize": True}, id="all"),
]


def _rewards(B, R, nan_frac=0.25):
    rewards = torch.randn(B, R) * 2 + torch.rand(R) * 3
    rewards[torch.rand(B, R) < nan_frac] = math.nan
    return rewards


def _kwargs(B, options):
    options = dict(options)
    if options.pop("with_kl", False):
        options["kl"] = torch.randn(B) * 3
    return options


def _loop_oracle(rewards, G, weights=None, reward_clip_range=None, kl=None, beta=0.0, normalize=False):
    """TRL's definition, one completion at a time in float64 Python."""
    B, R = rewards.shape
    weights = [1.0] * R if weights is None else [float(w) for w in weights]
    totals = []
    for b in range(B):
        scored = [(float(rewards[b, k]), weights[k]) for k in range(R) if not math.isnan(rewards[b, k])]
        total = sum(r * w for r, w in scored) if scored else math.nan
        if reward_clip_range is not None and not math.isnan(total):
            total = min(max(total, reward_clip_range[0]), reward_clip_range[1])
        totals.append(total - beta * float(kl[b]) if kl is not None else total)
    advantages = []
    for b in range(B):
        group = range(b - b % G, b - b % G + G)
        others = [totals[j] for j in group if j != b and not math.isnan(totals[j])]
        advantages.append(totals[b] - sum(others) / len(others) if others else math.nan)
    if normalize:
        valid = [a for a in advantages if not math.isnan(a)]
        mean = sum(valid) / len(valid)
        std = math.sqrt(sum((a - mean) ** 2 for a in valid) / (len(valid) - 1)) if len(valid) > 1 else math.nan
        advantages = [(a - mean) / (std + 1e-4) for a in advantages]
    return torch.tensor([0.0 if math.isnan(a) else a for a in advantages], dtype=torch.float64)


def _assert_matches_oracle(out, rewards, G, **kw):
    """Within 2x the float32 torch reference's error against float64 (plus a float32 ulp floor)."""
    ref32 = rloo_advantages_ref(rewards, G, **kw)
    ref64 = rloo_advantages_ref(
        rewards.double(), G, **{k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()}
    )
    torch.testing.assert_close(out, ref32, rtol=2e-5, atol=2e-5)
    err = (out.double() - ref64).abs().max().item()
    base = (ref32.double() - ref64).abs().max().item()
    assert err <= 2 * base + 1e-6 * (1 + ref64.abs().max().item()), (err, base)


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("B, G, R", SHAPES)
def test_kernel_matches_reference_and_loop(B, G, R, options):
    rewards = _rewards(B, R)
    kw = {"reward_weights": torch.rand(R) + 0.5, **_kwargs(B, options)}
    out, std = rloo_advantages(rewards, G, return_std=True, impl="triton", **kw)
    assert out.dtype == torch.float32 and out.shape == (B,) and torch.isfinite(out).all()
    _assert_matches_oracle(out, rewards, G, **kw)
    oracle = _loop_oracle(rewards.double(), G, weights=kw["reward_weights"], **{k: v for k, v in kw.items()
                                                                               if k != "reward_weights"})  # fmt: skip
    torch.testing.assert_close(out.double(), oracle, rtol=1e-4, atol=1e-5)
    _, ref_std = rloo_advantages_ref(rewards, G, return_std=True, **kw)
    torch.testing.assert_close(std, ref_std.float(), rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_unscorable_completions_and_lone_survivors_get_zero(impl):
    G = 4
    rewards = torch.tensor([[1.0], [2.0], [math.nan], [5.0]] + [[math.nan]] * 3 + [[7.0]] + [[3.0]] * 4)
    out, std = rloo_advantages(rewards, G, return_std=True, impl=impl)
    # group 1: the baseline of each scorable completion averages the two other scorable ones
    torch.testing.assert_close(out[:4], torch.tensor([1 - 3.5, 2 - 3.0, 0.0, 5 - 1.5]))
    assert (out[4:8] == 0).all()  # a single scorable completion has no baseline
    assert (out[8:] == 0).all() and (std[8:] == 0).all()  # constant rewards: zero advantage, zero std
    assert torch.isnan(std[4:8]).all()  # the std of one value is undefined (TRL's nanstd)


def test_kl_penalty_and_clip_order():
    # clipping applies to the rewards, before the KL penalty (as TRL)
    rewards = torch.tensor([[10.0], [0.0]])
    kl = torch.tensor([2.0, 0.0])
    out = rloo_advantages(rewards, 2, reward_clip_range=(0.0, 1.0), kl=kl, beta=0.5, impl="torch")
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0]))  # (1 - 1) vs 0: equal penalized rewards
    out = rloo_advantages(rewards, 2, kl=kl, beta=0.5, impl="triton")
    torch.testing.assert_close(out, torch.tensor([9.0, -9.0]))


def test_all_nan_gives_zeros():
    rewards = torch.full((6, 2), math.nan)
    for impl in ("triton", "torch"):
        assert (rloo_advantages(rewards, 3, normalize=True, impl=impl) == 0).all()


@settings(max_examples=25, deadline=None)
@given(
    groups=st.integers(1, 5),
    G=st.integers(2, 6),
    R=st.integers(1, 3),
    nan_frac=st.floats(0.0, 0.6),
    normalize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(groups, G, R, nan_frac, normalize, seed):
    torch.manual_seed(seed)
    B = groups * G
    rewards = _rewards(B, R, nan_frac)
    kw = {"kl": torch.randn(B), "beta": 0.1, "normalize": normalize}
    out = rloo_advantages(rewards, G, impl="triton", **kw)
    torch.testing.assert_close(out, rloo_advantages_ref(rewards, G, **kw), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_generations": 1}, ValueError, "num_generations must be an integer >= 2, got 1"),
        ({"rewards": torch.zeros(5, 1)}, ValueError, "rewards has 5 rows"),
        ({"reward_clip_range": (1.0, 0.0)}, ValueError, r"reward_clip_range must be \(min, max\)"),
        ({"kl": torch.zeros(3)}, ValueError, r"kl has shape \(3,\), expected \(4,\)"),
        ({"beta": math.nan}, ValueError, "beta must be a finite number"),
        ({"reward_weights": [1.0, 2.0]}, ValueError, "reward_weights has shape"),
    ],
    ids=["one_generation", "rows", "clip", "kl_shape", "beta", "weights"],
)
def test_bad_arguments(kwargs, error, match):
    args = {"rewards": torch.ones(4, 1), "num_generations": 2, **kwargs}
    with pytest.raises(error, match=match):
        rloo_advantages(args.pop("rewards"), args.pop("num_generations"), **args)
