"""posttrain.ops.grpo_advantages: Triton kernel vs the torch reference vs float64 vs TRL 1.16's GRPOTrainer."""

import math
from collections import defaultdict
from types import SimpleNamespace

import posttrain.kernels.grpo as grpo_kernels
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.ops.grpo_advantages import grpo_advantages, grpo_advantages_ref

# NaN-aware statistics of all-NaN groups divide 0 by 0 inside the interpreter's numpy
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

SCALES = ("group", "batch", "none")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
SHAPES = [
    pytest.param(2, 2, 1, id="B2-G2-R1"),
    pytest.param(6, 3, 2, id="B6-G3-R2"),
    pytest.param(18, 6, 3, id="B18-G6-R3"),
]


def _rewards(B, R, nan_frac=0.25):
    rewards = torch.randn(B, R) * 2 + torch.rand(R) * 3
    rewards[torch.rand(B, R) < nan_frac] = math.nan
    return rewards


def _assert_matches_oracle(out, rewards, num_generations, **kw):
    """The kernel's error vs float64 is at most ~2x that of the float32 torch reference (plus a float32 ulp floor)."""
    ref32 = grpo_advantages_ref(rewards, num_generations, **kw)
    ref64 = grpo_advantages_ref(rewards.double(), num_generations, **kw)
    torch.testing.assert_close(out, ref32, rtol=2e-5, atol=2e-5)
    err = (out.double() - ref64).abs().max().item()
    base = (ref32.double() - ref64).abs().max().item()
    assert err <= 2 * base + 1e-6 * (1 + ref64.abs().max().item()), (err, base)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("B, G, R", SHAPES)
def test_matches_reference(B, G, R, scale, aggregation):
    rewards = _rewards(B, R)
    weights = torch.rand(R) + 0.5
    kw = dict(reward_weights=weights, scale_rewards=scale, multi_objective_aggregation=aggregation)
    out, std = grpo_advantages(rewards, G, return_std=True, impl="triton", **kw)
    assert out.dtype == torch.float32 and out.shape == (B,)
    _assert_matches_oracle(out, rewards, G, **kw)
    _, ref_std = grpo_advantages_ref(rewards, G, return_std=True, **kw)
    torch.testing.assert_close(std, ref_std.float(), rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("scale", SCALES)
def test_nan_rewards(scale, aggregation):
    G, R = 4, 2
    rewards = _rewards(5 * G, R, nan_frac=0.3)
    rewards[1] = math.nan  # one unscorable completion
    rewards[G : 2 * G] = math.nan  # a whole unscorable group
    rewards[2 * G : 3 * G - 1] = math.nan  # a group with a single scorable completion
    rewards[3 * G : 4 * G, 0] = math.nan  # a reward function that never answered in this group
    rewards[4 * G : 5 * G] = torch.tensor([1.0, 0.0])  # constant rewards: zero std
    kw = dict(scale_rewards=scale, multi_objective_aggregation=aggregation)
    out = grpo_advantages(rewards, G, impl="triton", **kw)
    _assert_matches_oracle(out, rewards, G, **kw)
    assert torch.isfinite(out).all()
    assert out[1] == 0 and (out[G : 2 * G] == 0).all()
    if aggregation == "sum_then_normalize":
        # zero spread; a lone scorable completion is its group's mean (and its group std is undefined)
        assert (out[4 * G : 5 * G] == 0).all()
        assert (out[2 * G : 3 * G] == 0).all()


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("scale", SCALES)
def test_all_nan_gives_zeros(scale, aggregation):
    rewards = torch.full((6, 2), math.nan)
    for impl in ("triton", "torch"):
        out = grpo_advantages(rewards, 3, scale_rewards=scale, multi_objective_aggregation=aggregation, impl=impl)
        assert torch.equal(out, torch.zeros(6))


def test_group_scaling_normalizes_each_group():
    G = 8
    rewards = torch.randn(3 * G, 1) * torch.tensor([1.0, 10.0, 0.1]).repeat_interleave(G)[:, None] + 5
    out = grpo_advantages(rewards, G, impl="triton").view(3, G)
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(3), atol=1e-5, rtol=0)
    std = rewards.view(3, G).std(dim=1)
    torch.testing.assert_close(out.std(dim=1), std / (std + 1e-4), atol=1e-5, rtol=0)


def test_scale_rewards_booleans_and_weights():
    rewards = _rewards(8, 3)
    weights = [0.5, 1.0, 2.0]
    base = grpo_advantages(rewards, 4, reward_weights=weights, impl="triton")
    torch.testing.assert_close(
        base, grpo_advantages(rewards, 4, reward_weights=torch.tensor(weights), scale_rewards=True)
    )
    torch.testing.assert_close(
        grpo_advantages(rewards, 4, reward_weights=weights, scale_rewards=False, impl="triton"),
        grpo_advantages(rewards, 4, reward_weights=weights, scale_rewards="none", impl="torch"),
    )
    assert not torch.allclose(base, grpo_advantages(rewards, 4, impl="triton"))


def test_many_group_blocks_and_strides(monkeypatch):
    # one group per block, so the batch statistics span several sweeps; a transposed (non-contiguous) rewards view
    monkeypatch.setattr(grpo_kernels, "ADV_TILE_ELEMENTS", 8)
    rewards = _rewards(3, 18).t()
    assert not rewards.is_contiguous()
    for aggregation in AGGREGATIONS:
        for scale in ("batch", "group"):
            kw = dict(scale_rewards=scale, multi_objective_aggregation=aggregation)
            _assert_matches_oracle(grpo_advantages(rewards, 3, impl="triton", **kw), rewards.contiguous(), 3, **kw)


def test_half_precision_rewards():
    rewards = _rewards(12, 2).half()
    out = grpo_advantages(rewards, 4, scale_rewards="batch", impl="triton")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, grpo_advantages_ref(rewards, 4, scale_rewards="batch"), rtol=1e-5, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(
    groups=st.integers(1, 5),
    num_generations=st.integers(2, 7),
    num_funcs=st.integers(1, 4),
    nan_frac=st.sampled_from([0.0, 0.2, 0.6]),
    scale=st.sampled_from(SCALES),
    aggregation=st.sampled_from(AGGREGATIONS),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_random_shapes(groups, num_generations, num_funcs, nan_frac, scale, aggregation, seed):
    torch.manual_seed(seed)
    rewards = _rewards(groups * num_generations, num_funcs, nan_frac)
    weights = torch.rand(num_funcs) * 2 - 0.5
    kw = dict(reward_weights=weights, scale_rewards=scale, multi_objective_aggregation=aggregation)
    out = grpo_advantages(rewards, num_generations, impl="triton", **kw)
    assert torch.isfinite(out).all()
    _assert_matches_oracle(out, rewards, num_generations, **kw)


# TRL's own advantage code, run on a stand-in trainer: generation and reward functions are stubbed so that
# `_generate_and_score_completions` sees exactly `rewards` as its gathered rewards_per_func.
class _OneProcess:
    num_processes = 1
    process_index = 0

    @property
    def device(self):
        return torch.get_default_device()

    def gather(self, tensor):
        return tensor


def _trl_advantages(rewards, num_generations, weights, scale_rewards, aggregation):
    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    B, R = rewards.shape
    fake = SimpleNamespace(
        accelerator=_OneProcess(),
        model=SimpleNamespace(training=True, is_gradient_checkpointing=False),
        environment_factories=None,
        tools=[],
        environments=None,
        _generate=lambda prompts: ([[1]] * B, [[2, 3]] * B, None, ["c"] * B, None, {}, None, None),
        _calculate_rewards=lambda *args: rewards.clone(),
        _tokenizer=SimpleNamespace(pad_token_id=0),
        pad_to_multiple_of=None,
        mask_truncated_completions=False,
        args=SimpleNamespace(
            per_device_train_batch_size=B,
            steps_per_generation=1,
            gradient_accumulation_steps=1,
            gradient_checkpointing_kwargs=None,
        ),
        num_iterations=1,
        use_vllm=False,
        beta=0.0,
        num_generations=num_generations,
        multi_objective_aggregation=aggregation,
        scale_rewards=scale_rewards,
        reward_weights=torch.as_tensor(weights, dtype=torch.float32),
        reward_funcs=[None] * R,
        reward_func_names=[f"reward_{i}" for i in range(R)],
        _metrics={"train": defaultdict(list)},
        _logs={
            "prompt": [],
            "completion": [],
            "rewards": defaultdict(list),
            "advantages": [],
            "extra": defaultdict(list),
        },
        _pending_extra_logs={},
        _pending_metrics={},
        log_multimodal=False,
    )
    out = grpo_trainer.GRPOTrainer._generate_and_score_completions(fake, [{"prompt": "p"}] * B)
    return out["advantages"], fake._metrics["train"]["frac_reward_zero_std"][0]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("scale", SCALES)
def test_matches_trl(scale, aggregation):
    G, R = 4, 3
    rewards = _rewards(6 * G, R, nan_frac=0.3)
    rewards[2] = math.nan
    rewards[G : 2 * G] = math.nan
    rewards[2 * G : 3 * G - 1] = math.nan
    rewards[3 * G : 4 * G, 1] = math.nan
    rewards[4 * G : 5 * G] = torch.tensor([1.0, 0.0, 2.0])
    weights = torch.rand(R) + 0.5
    expected, frac_zero_std = _trl_advantages(rewards, G, weights, scale, aggregation)
    kw = dict(reward_weights=weights, scale_rewards=scale, multi_objective_aggregation=aggregation, return_std=True)
    ref, ref_std = grpo_advantages(rewards, G, impl="torch", **kw)
    torch.testing.assert_close(ref, expected, rtol=1e-6, atol=1e-6)
    out, std = grpo_advantages(rewards, G, impl="triton", **kw)
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)
    for s in (ref_std, std):
        assert torch.isclose(s, torch.zeros_like(s)).float().mean().item() == pytest.approx(frac_zero_std)


def test_bad_inputs():
    rewards = torch.randn(6, 2)
    with pytest.raises(ValueError, match="num_generations must be an integer >= 2, got 1"):
        grpo_advantages(rewards, 1)
    with pytest.raises(ValueError, match="6 rows .* not a multiple of num_generations \\(4\\)"):
        grpo_advantages(rewards, 4)
    with pytest.raises(ValueError, match="rewards must be 2-D, got shape \\(6,\\)"):
        grpo_advantages(torch.randn(6), 3)
    with pytest.raises(TypeError, match="rewards must be float32"):
        grpo_advantages(torch.ones(6, 2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="reward_weights has shape \\(3,\\), expected \\(2,\\)"):
        grpo_advantages(rewards, 3, reward_weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="scale_rewards 'groups' is not one of: group, batch, none"):
        grpo_advantages(rewards, 3, scale_rewards="groups")
    with pytest.raises(ValueError, match="multi_objective_aggregation 'sum' is not one of: sum_then_normalize, norm"):
        grpo_advantages(rewards, 3, multi_objective_aggregation="sum")
    with pytest.raises(ValueError, match="impl 'cudnn' is not one of: auto, triton, cuda, torch"):
        grpo_advantages(rewards, 3, impl="cudnn")
