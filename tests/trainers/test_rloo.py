"""RLOOTrainer: step-by-step parity with TRL 1.16's RLOOTrainer, its config, learning and bad inputs.

Parity: both trainers get the same tiny model directory, dataset, reward functions and config; with the same seed they
draw the same prompts, sample the same completions and log the same values (see test_grpo.py).
"""

import dataclasses

import pytest
import torch
import trl
from datasets import Dataset
from trainers.online_runs import Runs
from trainers.test_grpo import (
    BASE,
    STOP_IDS,
    assert_logs_close,
    conversational_dataset,
    distinct_tokens,
    letters_reward,
    solution_reward,
    standard_dataset,
)
from transformers import AutoModelForCausalLM

import posttrain
from posttrain.models import tiny_causal_lm


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-rloo")
    model, tokenizer = tiny_causal_lm(seed=0)
    model.generation_config.eos_token_id = [258, *STOP_IDS]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


# name: (dataset, trainer arguments, config overrides, evaluate)
PARITY = {
    "beta0_two_rewards_weighted_g2": (
        standard_dataset, {"reward_funcs": [letters_reward, distinct_tokens]},
        {"beta": 0.0, "reward_weights": [1.0, 0.5], "gradient_accumulation_steps": 2},
        False,
    ),
    "beta_g4_iterations2_clip_normalize": (
        standard_dataset, {"reward_funcs": [letters_reward, distinct_tokens]},
        {"beta": 0.1, "num_generations": 4, "num_iterations": 2, "reward_clip_range": (0.0, 0.6),
         "normalize_advantages": True, "epsilon_high": 0.28},
        False,
    ),
    "beta_conversational_truncated_eval": (
        conversational_dataset, {"reward_funcs": [solution_reward, letters_reward]},
        {"beta": 0.05, "reward_weights": [0.5, 2.0], "mask_truncated_completions": True, "steps_per_generation": 2,
         "temperature": 0.8, "num_generations_eval": 4},
        True,
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_dir):
    return Runs(tmp_path_factory, "RLOO", PARITY, BASE, model=model_dir)


@pytest.mark.parametrize("name", list(PARITY))
def test_logs_match_trl_step_by_step(runs, name):
    _, expected = runs.get(name, "trl")
    _, actual = runs.get(name, "posttrain")
    assert_logs_close(expected, actual)
    assert actual[0]["reward_std"] > 0 and actual[0]["grad_norm"] > 0  # the steps actually train


def test_kl_penalty_moves_the_advantages(runs):
    trainer, logs = runs.get("beta_g4_iterations2_clip_normalize", "posttrain")
    assert trainer.ref_model is not None
    assert logs[0]["kl"] == 0.0 and logs[2]["kl"] != 0.0  # the policy starts at the reference, then moves away
    assert [("reward" in entry) for entry in logs] == [True, False, True]  # num_iterations=2 reuses the batch
    assert "old_per_token_logps" in trainer._buffered_inputs[0]


def test_beta_zero_builds_no_reference_and_skips_the_old_pass(runs):
    trainer, logs = runs.get("beta0_two_rewards_weighted_g2", "posttrain")
    assert trainer.ref_model is None and "kl" not in logs[0]
    assert "old_per_token_logps" not in trainer._buffered_inputs[0]  # on-policy: the ratio is exactly 1
    assert all(entry["clip_ratio/region_mean"] == 0.0 for entry in logs)


def test_fused_kernels_off_gives_the_same_numbers(runs):
    _, fused = runs.get("beta_g4_iterations2_clip_normalize", "posttrain")
    _, plain = runs.get("beta_g4_iterations2_clip_normalize", "posttrain", use_fused_kernels=False)
    assert_logs_close(fused, plain)


def test_parameters_change_after_train(runs, model_dir):
    trainer, _ = runs.get("beta0_two_rewards_weighted_g2", "posttrain")
    initial = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    trained = trainer.model.state_dict()
    changed = [name for name, value in initial.items() if not torch.equal(value, trained[name].cpu())]
    assert len(changed) == len(initial)


def test_conversational_completions_are_assistant_messages(runs):
    trainer, _ = runs.get("beta_conversational_truncated_eval", "posttrain")
    completion = trainer._logs["completion"][0]
    assert isinstance(completion, list) and completion[0]["role"] == "assistant"
    assert trainer.reward_func_names == ["solution_reward", "letters_reward"]


def test_config_fields_and_defaults_match_trl():
    theirs = trl.RLOOConfig(output_dir="unused", bf16=False)
    ours = posttrain.RLOOConfig(output_dir="unused", bf16=False)
    for field in dataclasses.fields(theirs):
        assert getattr(ours, field.name) == getattr(theirs, field.name), field.name
    assert (ours.num_generations, ours.beta, ours.learning_rate) == (2, 0.05, 1e-6)
    assert ours.use_fused_kernels is True


def test_mean_reward_rises_on_a_toy_task(tmp_path):
    # As test_grpo.py's: the fraction of lowercase letters in 8 bytes, on the plain-torch path
    model, tokenizer = tiny_causal_lm(seed=0)
    args = posttrain.RLOOConfig(
        output_dir=str(tmp_path), **{**BASE, "per_device_train_batch_size": 16, "num_generations": 8,
        "max_steps": 20, "learning_rate": 2e-2, "seed": 0, "beta": 0.0, "use_fused_kernels": False},
    )  # fmt: skip
    dataset = Dataset.from_dict({"prompt": ["hi", "ok", "go", "yo"] * 4})
    trainer = posttrain.RLOOTrainer(
        model=model, processing_class=tokenizer, reward_funcs=letters_reward, args=args, train_dataset=dataset
    )
    trainer.train()
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert first < 0.3 and last > first + 0.3, rewards


# ---- bad input ----


def tiny_args(tmp_path, **overrides):
    kwargs = {**BASE, "max_steps": 1, "max_completion_length": 4, "use_fused_kernels": False, **overrides}
    return posttrain.RLOOConfig(output_dir=str(tmp_path), **kwargs)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"num_generations": 1}, ValueError, "num_generations must be >= 2, got 1"),
        ({"per_device_train_batch_size": 3}, ValueError, r"generation_batch_size \(3\) must be a multiple of"),
        ({"reward_clip_range": (1.0, 0.0)}, ValueError, r"reward_clip_range must be \(min, max\)"),
        ({"beta": -0.1}, ValueError, "beta must be a finite number >= 0"),
        ({"auto_find_batch_size": True}, ValueError, "auto_find_batch_size=True is not supported by RLOO"),
    ],
    ids=["one_generation", "batch_not_divisible", "clip_range", "beta", "auto_find_batch_size"],
)
def test_config_rejects_bad_values(tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        tiny_args(tmp_path, **overrides)


@pytest.mark.parametrize(
    ("dataset", "kwargs", "error", "match"),
    [
        (Dataset.from_dict({"question": ["a", "b"]}), {}, ValueError, r"no 'prompt' column \(columns: question\)"),
        (Dataset.from_dict({"prompt": ["a", "b"], "completions": ["x", "y"]}), {}, ValueError, "'completions'"),
        (standard_dataset(), {"reward_funcs": []}, ValueError, "reward_funcs is required"),
        (standard_dataset(), {"reward_funcs": [letters_reward, letters_reward], "args_extra": {"reward_weights": [1.0]}},
         ValueError, "reward_weights has 1 weights but there are 2"),
        (standard_dataset(), {"args_extra": {"sync_ref_model": True, "beta": 0.0}}, ValueError,
         "sync_ref_model=True needs a reference model, which RLOOTrainer builds only with beta != 0"),
    ],
    ids=["missing_prompt", "reserved_column", "no_reward", "weights", "sync_without_reference"],
)  # fmt: skip
def test_bad_inputs_are_clear_errors(model_dir, tmp_path, dataset, kwargs, error, match):
    kwargs = dict(kwargs)
    args = tiny_args(tmp_path, **kwargs.pop("args_extra", {}))
    with pytest.raises(error, match=match):
        posttrain.RLOOTrainer(model_dir, kwargs.pop("reward_funcs", letters_reward), args=args, train_dataset=dataset)


def test_resumed_run_ends_where_a_straight_run_does(model_dir, tmp_path):
    # num_iterations=2: the checkpoint at step 3 holds the generation batch still in use (the shared online buffer)
    def trainer(output_dir):
        args = tiny_args(output_dir, max_steps=4, num_iterations=2, beta=0.05, save_strategy="steps", save_steps=1,
                         logging_steps=1, learning_rate=1e-2)  # fmt: skip
        return posttrain.RLOOTrainer(model_dir, [letters_reward, distinct_tokens], args=args,
                                     train_dataset=standard_dataset())  # fmt: skip

    straight = trainer(tmp_path / "straight")
    straight.train()
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-3"))
    for (name, param), resumed_param in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(param, resumed_param), name
    assert resumed.state.log_history[-2]["loss"] == straight.state.log_history[-2]["loss"]
