"""The generation backends on the CPU (transformers' generate and continuous batching) and TRL's importance-sampling
correction: its ratio against a float64 reference, the sampled tokens' log-probs against an independent
recomputation, and GRPO trained with the correction on transformers' samples."""

import inspect
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import trl
from accelerate import Accelerator
from fake_vllm import EOS_IDS, GRPO_BASE, save_tiny_policy, train_grpo
from transformers.generation import ContinuousBatchingConfig

import posttrain
from posttrain.models import tiny_causal_lm
from posttrain.trainers.generation import (
    ContinuousBatchingGeneration,
    TransformersGeneration,
    importance_sampling_ratio,
    sampling_mismatch_stats,
)

# a few blocks of a few tokens: transformers sizes the paged cache from free memory otherwise (slow on the CPU); the
# block's length is `block_size` in transformers 5.17 (the GPU image's), `page_size` in later versions
_BLOCK_LENGTH = next(name for name in ("page_size", "block_size")
                     if name in inspect.signature(ContinuousBatchingConfig).parameters)  # fmt: skip
SMALL_CACHE = {"num_blocks": 16, _BLOCK_LENGTH: 16, "max_batch_tokens": 256}
MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_policy(tmp_path_factory.mktemp("tiny-generation"))


# ---- importance-sampling correction ----


def ratio_reference(old, sampling, mask, mode, clip_min, clip_max):
    """TRL 1.16's correction, one row and one token at a time in float64."""
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    rows = []
    for o_row, s_row, m_row in zip(old.double().tolist(), sampling.double().tolist(), mask.tolist()):
        diffs = [0.0 if not m or math.isnan(o - s) else o - s for o, s, m in zip(o_row, s_row, m_row)]
        values = [math.exp(sum(diffs))] if mode.startswith("sequence") else [math.exp(d) for d in diffs]
        if mode.endswith("truncate"):
            values = [min(max(v, low), high) for v in values]
        else:
            values = [0.0 if v < low or v > high else v for v in values]
        rows.append(values)
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bounds", [(None, 3.0), (0.8, 1.2), (0.5, None)], ids=["max", "both", "min"])
def test_importance_sampling_ratio_matches_a_float64_reference(mode, bounds):
    B, T = 5, 37
    old = -torch.rand(B, T) * 3
    sampling = old + torch.randn(B, T) * 0.1
    sampling[1, 4] = math.nan  # a token the engine could not score: no correction there
    mask = torch.rand(B, T) > 0.2
    mask[2] = False  # an empty completion
    sampling[~mask] = torch.randn(int((~mask).sum())) * 50  # padding carries anything
    ratio = importance_sampling_ratio(old, sampling, mask.int(), mode=mode, clip_min=bounds[0], clip_max=bounds[1])
    expected = ratio_reference(old, sampling, mask, mode, *bounds)
    assert ratio.shape == expected.shape == ((B, 1) if mode.startswith("sequence") else (B, T))
    torch.testing.assert_close(ratio.double(), expected, rtol=1e-5, atol=1e-6)
    if bounds == (0.8, 1.2):  # the bounds cut something in every mode
        assert ((ratio == 0) | (ratio == 0.8) | (ratio == 1.2)).any()


def test_sampling_mismatch_stats():
    old = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    sampling = torch.tensor([[-1.5, math.nan, -3.0], [-0.5, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    ratio = importance_sampling_ratio(old, sampling, mask, mode="token_mask", clip_max=1.5)
    stats = sampling_mismatch_stats(old, sampling, mask, ratio, mode="token_mask")
    # the scored completion tokens differ by 0.5, 0 and 0.5; the 4 completion tokens' ratios are e^0.5 (above 1.5:
    # masked to 0), 1 (unscored), 1 and e^-0.5
    assert stats["mean_delta"].item() == pytest.approx(1 / 3) and stats["max_delta"].item() == 0.5
    assert stats["ratio_min"].item() == 0.0 and stats["ratio_max"].item() == 1.0
    assert stats["ratio_mean"].item() == pytest.approx((0 + 1 + 1 + math.exp(-0.5)) / 4)
    sequence = importance_sampling_ratio(old, sampling, mask, mode="sequence_truncate", clip_max=1.5)
    stats = sampling_mismatch_stats(old, sampling, mask, sequence, mode="sequence_truncate")
    assert stats["ratio_min"].item() == pytest.approx(math.exp(-0.5)) and stats["ratio_max"].item() == 1.5


# ---- transformers backends ----


def processed_logprobs(model, ids: list[int], token: int, temperature: float, top_k: int, top_p: float):
    """The log-prob of `token` after `ids` under transformers' sampling warpers (temperature, then top-k, then
    top-p), and under temperature alone (the trainer's), recomputed in float64 from a full forward without padding
    or cache."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].double() / temperature
    trainer = logits.log_softmax(-1)[token].item()
    if top_k:
        logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[-1], -math.inf)
    ascending, order = logits.sort()
    removed = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
    removed[-1] = False
    logits[order[removed]] = -math.inf
    return logits.log_softmax(-1)[token].item(), trainer


def backend_args(tmp_path, **overrides):
    return posttrain.GRPOConfig(output_dir=str(tmp_path), **{**GRPO_BASE, **overrides})


def test_generate_reports_the_processed_logprobs(model_dir, tmp_path):
    """Each reported log-prob is the sampled token's under the distribution generate sampled from (left padding and
    KV cache included); top-k / top-p renormalize, so it is above the trainer's temperature-only log-prob."""
    model, tokenizer = tiny_causal_lm(seed=0)
    args = backend_args(tmp_path, temperature=0.8, top_k=40, top_p=0.7)
    backend = TransformersGeneration(args, tokenizer, EOS_IDS, Accelerator(cpu=True), report_logprobs=True)
    prompts = [[104, 101, 108, 108, 111], [97], [120, 121, 122, 33]]
    out = backend.generate(model, prompts, num_generations=1)
    assert [len(lp) for lp in out.logprobs] == [len(ids) for ids in out.ids] and max(map(len, out.ids)) > 1
    gaps = []
    for prompt, ids, logprobs in zip(prompts, out.ids, out.logprobs):
        for t, (token, logprob) in enumerate(zip(ids, logprobs)):
            expected, trainer = processed_logprobs(model, prompt + ids[:t], token, 0.8, 40, 0.7)
            assert logprob == pytest.approx(expected, abs=1e-4)
            gaps.append(logprob - trainer)
    assert min(gaps) > -1e-4 and max(gaps) > 0.05


def test_continuous_batching_matches_generate_under_greedy_decoding(tmp_path):
    model, tokenizer = tiny_causal_lm(seed=0)
    args = backend_args(
        tmp_path, generation_kwargs={"do_sample": False}, transformers_continuous_batching_config=SMALL_CACHE
    )
    prompts = [[104, 101, 108, 108, 111], [97, 98], [120, 121, 122, 33], [113]]
    generate = TransformersGeneration(args, tokenizer, EOS_IDS, Accelerator(cpu=True), report_logprobs=True)
    batching = ContinuousBatchingGeneration(args, tokenizer, EOS_IDS, Accelerator(cpu=True), report_logprobs=True)
    expected, actual = generate.generate(model, prompts, 1), batching.generate(model, prompts, 1)
    assert actual.ids == expected.ids
    for want, got in zip(expected.logprobs, actual.logprobs):
        assert got == pytest.approx(want, abs=1e-4)


# ---- GRPO ----


def train(module, model_dir, tmp_path, **overrides):
    return train_grpo(module, model_dir, tmp_path / module.__name__, **overrides)


def test_grpo_corrects_transformers_samples(model_dir, tmp_path):
    """With transformers_sampling_logprobs, generate's log-probs (top-p renormalized: above the trainer's) drive
    TRL's correction: the logged ratios are below 1, the batch carries them, and they weight the loss (the random
    tiny model is near-uniform, so top_p=0.6 lifts every sampled token's log-prob by about -log 0.6: ratios ~0.6)."""
    sampling = {"temperature": 0.9, "top_p": 0.6, "transformers_sampling_logprobs": True, "max_steps": 3,
                "vllm_importance_sampling_mode": "token_truncate", "vllm_importance_sampling_clip_min": 0.5}  # fmt: skip
    trainer, logs = train(posttrain, model_dir, tmp_path / "on", **sampling)
    _, uncorrected = train(
        posttrain, model_dir, tmp_path / "off", **sampling, vllm_importance_sampling_correction=False
    )
    for entry in logs:
        assert entry["sampling/sampling_logp_difference/mean"] > 0.05
        assert 0.5 <= entry["sampling/importance_sampling_ratio/min"] < 0.9
        assert entry["sampling/importance_sampling_ratio/max"] <= 1.0 + 1e-5
    batch = trainer._buffered_inputs[0]
    expected = importance_sampling_ratio(
        batch["old_per_token_logps"], batch["sampling_per_token_logps"], batch["completion_mask"],
        mode="token_truncate", clip_min=0.5, clip_max=3.0,
    )  # fmt: skip
    torch.testing.assert_close(batch["importance_sampling_ratio"], expected)
    assert "sampling/importance_sampling_ratio/mean" not in uncorrected[0]
    # step 1 samples the same completions with the same weights: on-policy, each token's loss is weighted by its ratio
    assert logs[0]["reward"] == uncorrected[0]["reward"] and uncorrected[0]["loss"] < -0.1
    ratio = logs[0]["sampling/importance_sampling_ratio/mean"]
    assert logs[0]["loss"] == pytest.approx(uncorrected[0]["loss"] * ratio, rel=2e-2)


def test_continuous_batching_matches_trl(model_dir, tmp_path):
    overrides = {"use_transformers_continuous_batching": True, "transformers_continuous_batching_config": SMALL_CACHE}
    _, expected = train(trl, model_dir, tmp_path, **overrides)
    _, actual = train(posttrain, model_dir, tmp_path, **overrides)
    assert len(expected) == len(actual) == 2
    for want, got in zip(expected, actual):
        keys = {k for k in want if not k.endswith(("step_time", "runtime", "per_second"))}
        assert keys == {k for k in got if not k.endswith(("step_time", "runtime", "per_second"))}
        for key in keys:
            assert got[key] == pytest.approx(want[key], rel=1e-3, abs=1e-6), key


# ---- sharded policies: DeepSpeed ZeRO-3 and FSDP2 (one process, partitioned all the same) ----

SHARDED_SCRIPT = r"""
import copy
from types import SimpleNamespace

import deepspeed
import peft
import torch
from torch.distributed.fsdp import fully_shard
from transformers import GenerationConfig

from posttrain.models import tiny_causal_lm
from posttrain.trainers.generation.weights import engine_weights, model_for_generation

torch.distributed.init_process_group("gloo", rank=0, world_size=1)
reference = tiny_causal_lm(seed=0)[0].eval()
expected = reference.state_dict()
ids = torch.tensor([[104, 101, 108, 108]])
config = GenerationConfig(max_new_tokens=6, do_sample=False, pad_token_id=256)
greedy = reference.generate(ids, generation_config=config)
zero3 = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3,
         "stage3_param_persistence_threshold": 0}, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}

# ZeRO-3: each parameter gathered alone for the engine; the whole model for generate (or fetched layer by layer)
engine, *_ = deepspeed.initialize(model=tiny_causal_lm(seed=0)[0], config=zero3)
assert all(p.ds_status.name == "NOT_AVAILABLE" and p.numel() == 0 for p in engine.module.parameters())
weights = [(name, tensor.clone()) for name, tensor in engine_weights(engine.module)]
assert [name for name, _ in weights] == [name for name, _ in reference.named_parameters()]
assert all(torch.equal(tensor, expected[name]) for name, tensor in weights)
accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)),
                              unwrap_model=lambda wrapped: wrapped.module)
for gather in (True, False):
    with model_for_generation(engine, accelerator, gather_zero3=gather) as unwrapped:
        assert torch.equal(unwrapped.generate(ids, generation_config=config), greedy), gather
assert all(p.ds_status.name == "NOT_AVAILABLE" for p in engine.module.parameters())

# ZeRO-3 + PEFT: the adapter merged into the gathered base weights, under the base names, then unmerged
lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
torch.manual_seed(0)
adapted = peft.get_peft_model(tiny_causal_lm(seed=0)[0], lora)
merged = copy.deepcopy(adapted).merge_and_unload().state_dict()
engine, *_ = deepspeed.initialize(model=adapted, config=zero3)
weights = dict((name, tensor.clone()) for name, tensor in engine_weights(engine.module))
assert sorted(weights) == sorted(name for name, _ in reference.named_parameters())
assert all(torch.allclose(tensor, merged[name], atol=1e-6) for name, tensor in weights.items())
q_proj = "model.layers.0.self_attn.q_proj.weight"
assert not torch.allclose(weights[q_proj], expected[q_proj], atol=1e-4)
assert not any(getattr(module, "merged", False) for module in engine.module.modules())

# FSDP2: DTensor shards, full_tensor() per parameter
sharded = tiny_causal_lm(seed=0)[0]
mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (1,))
for layer in sharded.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(sharded, mesh=mesh)
assert all(type(p).__name__ == "DTensor" for p in sharded.parameters())
weights = list(engine_weights(sharded))
assert [name for name, _ in weights] == [name for name, _ in reference.named_parameters()]
assert all(type(t).__name__ == "Tensor" and torch.equal(t, expected[name]) for name, t in weights)
# FSDP1: each unit summoned alone, the root first (nothing has run forward yet); PEFT merged in the summoned model
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

def fsdp1(model):
    return FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({Qwen2DecoderLayer}),
                                    device_id=torch.device("cpu"), use_orig_params=True)

wrapped = fsdp1(tiny_causal_lm(seed=0)[0])
weights = list(engine_weights(wrapped))
assert sorted(name for name, _ in weights) == sorted(name for name, _ in reference.named_parameters())
assert all(torch.equal(tensor, expected[name]) for name, tensor in weights)
accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None, fsdp_plugin=SimpleNamespace(fsdp_version=1)),
                              unwrap_model=lambda wrapped: wrapped.module)
with model_for_generation(wrapped, accelerator) as unwrapped:
    assert torch.equal(unwrapped.generate(ids, generation_config=config), greedy)
torch.manual_seed(0)
adapted = peft.get_peft_model(tiny_causal_lm(seed=0)[0], lora)
merged = copy.deepcopy(adapted).merge_and_unload().state_dict()
wrapped = fsdp1(adapted)
weights = dict((name, tensor.clone()) for name, tensor in engine_weights(wrapped))
assert sorted(weights) == sorted(name for name, _ in reference.named_parameters())
assert all(torch.allclose(tensor, merged[name], atol=1e-6) for name, tensor in weights.items())

torch.distributed.destroy_process_group()
print("sharded generation checks passed")
"""


def test_sharded_policies_generate_and_sync_whole_weights(tmp_path):
    """Under ZeRO-3 (every parameter partitioned) the engine gets each weight gathered whole, PEFT adapters merged
    in; generate sees the gathered model (or fetches layer by layer with ds3_gather_for_generation=False); FSDP2's
    DTensors are sent as full tensors; FSDP1 summons unit by unit (the whole model for a PEFT merge) and around
    generate. One process (gloo), in a subprocess: DeepSpeed's and torch.distributed's state are process-wide."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
           "LOCAL_RANK": "0", "WORLD_SIZE": "1", "DS_SKIP_SHM_COMM": "1"}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0 and "checks passed" in result.stdout, result.stderr[-3000:]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
