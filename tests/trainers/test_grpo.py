"""GRPOTrainer: step-by-step parity with TRL 1.16's GRPOTrainer, learning, normalization and bad inputs.

Parity: both trainers get the same tiny model directory, dataset, reward functions and config; with the same seed they
draw the same prompts, sample the same completions (same RNG calls in the same order) and log the same values.
"""

import math
import os
import warnings

import pytest
import torch
import trl
from datasets import Dataset, IterableDataset
from moe_utils import tiny_moe_lm
from transformers import AutoModelForCausalLM, Qwen2ForSequenceClassification

import posttrain
from posttrain.data.grpo import RepeatSampler, shuffle_batch, split_batch, tokenize_prompts
from posttrain.models import byte_level_tokenizer, tiny_causal_lm, tiny_qwen2_config
from posttrain.rewards import think_format_reward
from posttrain.trainers.generation import truncate_after_eos

# Byte tokens that also end a completion, so that completion lengths vary (the random model rarely samples EOS)
STOP_IDS = list(range(60, 90))
PROMPTS = ["hello", "abc", "xyz!", "qq", "ab", "b"]
TIMING_KEYS = ("step_time", "runtime", "preparation_time", "samples_per_second", "steps_per_second")


def _text(completion):
    return completion if isinstance(completion, str) else completion[0]["content"]


def letters_reward(completions, **kwargs):
    return [sum(ch in "abcdefghijklmnopqrstuvwxyz" for ch in _text(c)) / 8 for c in completions]


def distinct_tokens(completion_ids, **kwargs):
    return [None if len(ids) % 3 == 0 else float(len(set(ids))) for ids in completion_ids]


def solution_reward(completions, solution, trainer_state, **kwargs):
    assert trainer_state.global_step >= 0
    return [float(s in _text(c)) + 0.05 * len(_text(c)) for c, s in zip(completions, solution)]


def standard_dataset():
    return Dataset.from_dict({"prompt": PROMPTS})


def conversational_dataset():
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    return Dataset.from_dict({"prompt": prompts, "solution": list("abcdea")})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-grpo")
    model, tokenizer = tiny_causal_lm(seed=0)
    model.generation_config.eos_token_id = [258, *STOP_IDS]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def moe_model_dir(tmp_path_factory):
    model, tokenizer = tiny_moe_lm(seed=0)
    model.generation_config.eos_token_id = [258, *STOP_IDS]
    path = tmp_path_factory.mktemp("tiny-moe")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-reward")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        Qwen2ForSequenceClassification(tiny_qwen2_config(num_labels=1)).save_pretrained(path)
    byte_level_tokenizer().save_pretrained(path)
    return str(path)


BASE = {
    "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4, "num_generations": 2,
    "max_completion_length": 8, "max_steps": 3, "logging_steps": 1, "bf16": False, "report_to": "none",
    "learning_rate": 1e-2, "seed": 1, "gradient_checkpointing": False, "disable_tqdm": True,
}  # fmt: skip

# name: (dataset, reward functions ("reward_model" = the tiny reward model's path), config overrides, evaluate)
PARITY = {
    "dapo_ga2_none_rewards": (standard_dataset, ["letters", "distinct"], {"gradient_accumulation_steps": 2}, False),
    "grpo_beta_iterations2_sync": (
        standard_dataset, ["letters", "distinct"],
        {"loss_type": "grpo", "beta": 0.1, "num_iterations": 2, "sync_ref_model": True, "ref_model_sync_steps": 2,
         "gradient_checkpointing": True},
        False,
    ),
    "sapo_sequence_batch_truncated": (
        standard_dataset, ["letters", "distinct"],
        {"loss_type": "sapo", "importance_sampling_level": "sequence", "scale_rewards": "batch",
         "mask_truncated_completions": True, "steps_per_generation": 2, "entropy_coef": 0.01, "top_k": 50,
         "temperature": 0.8},
        False,
    ),
    "bnpo_entropy_mask_off_policy": (
        standard_dataset, ["letters", "distinct"],
        {"loss_type": "bnpo", "top_entropy_quantile": 0.5, "off_policy_mask_threshold": 0.0, "num_iterations": 2,
         "entropy_coef": 0.01, "beta": 0.05},
        False,
    ),
    "vespo_beta_iterations": (
        standard_dataset, ["letters", "distinct"],
        {"loss_type": "vespo", "num_iterations": 2, "beta": 0.05, "vespo_k_pos": 1.5, "vespo_lambda_neg": 2.5},
        False,
    ),
    "conversational_reward_model_eval": (
        conversational_dataset, ["solution", "reward_model"],
        {"loss_type": "cispo", "epsilon_high": 0.5, "multi_objective_aggregation": "normalize_then_sum",
         "reward_weights": [1.0, 0.5], "num_generations_eval": 4},
        True,
    ),
}  # fmt: skip


class Runs:
    """Trains (library, config) pairs once per module and keeps the trainers and their logs."""

    def __init__(self, tmp_path_factory, model_dirs, reward_model_dir):
        self.tmp, self.model_dirs, self.reward_model_dir = tmp_path_factory, model_dirs, reward_model_dir
        self.cache = {}

    def reward_funcs(self, names):
        table = {"letters": letters_reward, "distinct": distinct_tokens, "solution": solution_reward}
        return [self.reward_model_dir if n == "reward_model" else table[n] for n in names]

    def get(self, name, library, model="dense", **extra):
        key = (name, library, model, tuple(sorted(extra.items())))
        if key not in self.cache:
            dataset_fn, funcs, overrides, evaluate = PARITY[name]
            module = trl if library == "trl" else posttrain
            args = module.GRPOConfig(output_dir=str(self.tmp.mktemp("out")), **{**BASE, **overrides, **extra})
            trainer = module.GRPOTrainer(
                model=self.model_dirs[model], reward_funcs=self.reward_funcs(funcs), args=args,
                train_dataset=dataset_fn(), eval_dataset=dataset_fn() if evaluate else None,
            )  # fmt: skip
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer.train()
                eval_logs = [trainer.evaluate()] if evaluate else []
            logs = [entry for entry in trainer.state.log_history if "train_runtime" not in entry][: BASE["max_steps"]]
            self.cache[key] = (trainer, logs + eval_logs)
        return self.cache[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_dir, moe_model_dir, reward_model_dir):
    return Runs(tmp_path_factory, {"dense": model_dir, "moe": moe_model_dir}, reward_model_dir)


def assert_logs_close(expected: list[dict], actual: list[dict]):
    """Same keys, same values. Step 1 (and evaluation after it) to 1e-4 relative. Later steps to 1e-3 relative: both
    runs update from step-1 gradients that agree to ~1e-7 (fp32 summation order: the fused kernel vs TRL's chunked
    head), but Adam divides each update by the gradient's running RMS, which amplifies those differences for
    near-zero gradient entries; we measured <= 5e-5 at steps 2-3. A semantic difference (a normalizer, a mask, a
    sampled token) moves values by far more. atol 1e-6 covers values that are 0 up to rounding (the loss of
    on-policy steps)."""
    assert len(expected) == len(actual) > 0
    for i, (want, got) in enumerate(zip(expected, actual)):
        rtol = 1e-4 if i == 0 else 1e-3
        keys = {k for k in want if not k.endswith(TIMING_KEYS)}
        assert keys == {k for k in got if not k.endswith(TIMING_KEYS)}, f"entry {i}: logged keys differ"
        for key in sorted(keys):
            a, b = want[key], got[key]
            if a is None or b is None:
                assert a is None and b is None, f"entry {i}, {key}: {a} vs {b}"
            else:
                assert math.isclose(a, b, rel_tol=rtol, abs_tol=1e-6), f"entry {i}, {key}: TRL {a} vs posttrain {b}"


@pytest.mark.parametrize("name", list(PARITY))
def test_logs_match_trl_step_by_step(runs, name):
    _, expected = runs.get(name, "trl")
    _, actual = runs.get(name, "posttrain")
    assert_logs_close(expected, actual)
    assert actual[0]["reward_std"] > 0 and actual[0]["grad_norm"] > 0  # the steps actually train


def test_fused_kernels_off_gives_the_same_numbers(runs):
    _, fused = runs.get("dapo_ga2_none_rewards", "posttrain")
    _, plain = runs.get("dapo_ga2_none_rewards", "posttrain", use_fused_kernels=False)
    assert_logs_close(fused, plain)


def test_parameters_change_after_train(runs, model_dir):
    trainer, _ = runs.get("dapo_ga2_none_rewards", "posttrain")
    initial = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    trained = trainer.model.state_dict()
    changed = [name for name, value in initial.items() if not torch.equal(value, trained[name].cpu())]
    assert len(changed) == len(initial)


def test_reference_model_only_with_beta(runs, model_dir):
    with_beta, logs = runs.get("grpo_beta_iterations2_sync", "posttrain")
    without_beta, plain_logs = runs.get("dapo_ga2_none_rewards", "posttrain")
    assert without_beta.ref_model is None and "kl" not in plain_logs[0]
    assert with_beta.ref_model is not None
    assert logs[0]["kl"] == 0.0 and logs[1]["kl"] > 0  # the policy starts at the reference, then moves away
    # the reference is never trained, only mixed with the policy by sync_ref_model (after step 2): it moved, and
    # unlike the policy it is not at the trained weights
    initial = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    ref, policy = with_beta.ref_model.state_dict(), with_beta.model.state_dict()
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(ref[name], initial[name]) and not torch.equal(ref[name], policy[name])


def test_num_iterations_reuses_each_generation_batch(runs):
    trainer, logs = runs.get("grpo_beta_iterations2_sync", "posttrain")
    assert [("reward" in entry) for entry in logs] == [True, False, True]  # sampled at steps 1 and 3 only
    assert "old_per_token_logps" in trainer._buffered_inputs[0]
    assert logs[1]["clip_ratio/region_mean"] >= 0  # the second pass is off-policy: ratios are not all 1


def test_moe_aux_loss_matches_trl(runs):
    """An explicit router_aux_loss_coef times the load-balancing loss of each micro-batch, scaled for gradient
    accumulation as the policy loss is; aux_loss logged as TRL."""
    _, expected = runs.get("dapo_ga2_none_rewards", "trl", model="moe", router_aux_loss_coef=0.1)
    trainer, actual = runs.get("dapo_ga2_none_rewards", "posttrain", model="moe", router_aux_loss_coef=0.1)
    assert_logs_close(expected, actual)
    assert all(1.0 < entry["aux_loss"] < 4.0 for entry in actual)  # 4 experts, top-2: ~2 when balanced
    assert trainer.router_aux_loss_coef == 0.1 and trainer.aux_loss_enabled


def test_moe_router_aux_loss_coef_zero_adds_no_aux_term(runs):
    _, with_aux = runs.get("dapo_ga2_none_rewards", "posttrain", model="moe", router_aux_loss_coef=0.1)
    trainer, without = runs.get(
        "dapo_ga2_none_rewards", "posttrain", model="moe", router_aux_loss_coef=0.0, max_steps=1
    )
    assert not trainer.aux_loss_enabled and all("aux_loss" not in entry for entry in without)
    # the same completions from the same weights at step 1: the losses differ by exactly the weighted aux term
    assert with_aux[0]["reward"] == without[0]["reward"]
    assert math.isclose(with_aux[0]["loss"] - without[0]["loss"], 0.1 * with_aux[0]["aux_loss"], rel_tol=1e-3)


def test_router_aux_loss_coef_on_a_dense_model_is_an_error(model_dir, tmp_path):
    with pytest.raises(ValueError, match="router_aux_loss_coef=0.01, but Qwen2ForCausalLM is not a Mixture-of-Experts"):
        posttrain.GRPOTrainer(
            model_dir, letters_reward, args=tiny_args(tmp_path, router_aux_loss_coef=0.01),
            train_dataset=standard_dataset(),
        )  # fmt: skip


def test_conversational_completions_are_assistant_messages(runs):
    trainer, _ = runs.get("conversational_reward_model_eval", "posttrain")
    completion = trainer._logs["completion"][0]
    assert isinstance(completion, list) and completion[0]["role"] == "assistant"
    assert trainer.reward_func_names == ["solution_reward", os.path.basename(runs.reward_model_dir)]


def _train_both(model_dir, tmp_path, reward_funcs, *, evaluate_only=False, trainer_kwargs=None, **overrides):
    logs = []
    for module in (trl, posttrain):
        args = module.GRPOConfig(output_dir=str(tmp_path / module.__name__), **{**BASE, **overrides})
        trainer = module.GRPOTrainer(
            model=model_dir, reward_funcs=reward_funcs, args=args, train_dataset=standard_dataset(),
            eval_dataset=standard_dataset(), **(trainer_kwargs or {}),
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logs.append([trainer.evaluate()] if evaluate_only else (trainer.train(), trainer.state.log_history)[1])
    return logs


def test_evaluation_with_one_generation_per_prompt_matches_trl(model_dir, tmp_path):
    expected, actual = _train_both(
        model_dir, tmp_path, [letters_reward], evaluate_only=True, num_generations_eval=1, scale_rewards="batch"
    )
    assert_logs_close(expected, actual)
    assert actual[0]["eval_loss"] == 0.0  # a group of one has no baseline: every advantage is 0


def test_peft_adapter_with_reference_matches_trl(model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    expected, actual = _train_both(
        model_dir, tmp_path, [letters_reward, distinct_tokens], trainer_kwargs={"peft_config": lora}, max_steps=2, beta=0.1,
        gradient_checkpointing=True,
    )  # fmt: skip
    assert_logs_close(expected[:2], actual[:2])
    assert actual[1]["kl"] > 0  # the reference (adapters disabled) and the trained adapter differ


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_gradient_accumulation_does_not_change_the_update(model_dir, tmp_path, loss_type):
    # One generation batch of 8 completions: one micro-batch of 8, or two of 4 accumulated. Same prompts, same
    # completions, same shuffle; the normalization must make the accumulated gradient identical
    results = []
    for batch, accumulation in ((8, 1), (4, 2)):
        args = posttrain.GRPOConfig(
            output_dir=str(tmp_path / f"ga{accumulation}"), **{**BASE, "max_steps": 1, "loss_type": loss_type,
            "per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation,
            "use_fused_kernels": False},
        )  # fmt: skip
        trainer = posttrain.GRPOTrainer(
            model=model_dir, reward_funcs=[letters_reward], args=args, train_dataset=standard_dataset()
        )
        trainer.train()
        results.append(trainer.state.log_history[0])
    (one, two) = results
    assert one["reward"] == two["reward"] and one["grad_norm"] > 0
    assert math.isclose(one["grad_norm"], two["grad_norm"], rel_tol=1e-5)
    assert math.isclose(one["loss"], two["loss"], rel_tol=1e-5, abs_tol=1e-7)


def test_mean_reward_rises_on_a_toy_task(tmp_path):
    # Reward: the fraction of lowercase letters in 8 bytes. A random byte-level model starts near 26/259 per token
    # and learns to emit letters. Plain-torch path (use_fused_kernels=False): the Triton interpreter would make 20
    # steps slow on CPU; the fused path's numbers are checked against it above.
    model, tokenizer = tiny_causal_lm(seed=0)
    args = posttrain.GRPOConfig(
        output_dir=str(tmp_path), **{**BASE, "per_device_train_batch_size": 16, "num_generations": 8,
        "max_steps": 20, "learning_rate": 2e-2, "seed": 0, "use_fused_kernels": False},
    )  # fmt: skip
    dataset = Dataset.from_dict({"prompt": ["hi", "ok", "go", "yo"] * 4})
    trainer = posttrain.GRPOTrainer(
        model=model, processing_class=tokenizer, reward_funcs=letters_reward, args=args, train_dataset=dataset
    )
    trainer.train()
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    assert len(rewards) == 20
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert first < 0.3 and last > first + 0.3, rewards


# ---- bad input ----


def tiny_args(tmp_path, **overrides):
    kwargs = {**BASE, "max_steps": 1, "max_completion_length": 4, "use_fused_kernels": False, **overrides}
    return posttrain.GRPOConfig(output_dir=str(tmp_path), **kwargs)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"num_generations": 1}, ValueError, "num_generations must be >= 2"),
        ({"per_device_train_batch_size": 3}, ValueError, r"generation_batch_size \(3\) must be a multiple of"),
        ({"generation_batch_size": 8, "steps_per_generation": 2}, ValueError, "not both"),
        ({"generation_batch_size": 6}, ValueError, "multiple of the global batch size"),
        ({"loss_type": "sigmod"}, ValueError, "loss_type 'sigmod' is not one of: grpo"),
        ({"scale_rewards": "std"}, ValueError, "scale_rewards 'std' is not one of"),
        ({"importance_sampling_level": "seq"}, ValueError, "importance_sampling_level 'seq'"),
    ],
    ids=["one_generation", "batch_not_divisible", "both_batch_fields", "gen_batch_vs_global", "loss_type",
         "scale_rewards", "is_level"],
)  # fmt: skip
def test_config_rejects_bad_values(tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        tiny_args(tmp_path, **overrides)


def test_config_maps_scale_rewards_booleans(tmp_path):
    assert tiny_args(tmp_path, scale_rewards=True).scale_rewards == "group"
    assert tiny_args(tmp_path, scale_rewards=False).scale_rewards == "none"


@pytest.mark.parametrize(
    ("dataset", "error", "match"),
    [
        (lambda: Dataset.from_dict({"question": PROMPTS}), ValueError, "no 'prompt' column \\(columns: question\\)"),
        (lambda: Dataset.from_dict({"prompt": []}), ValueError, "train_dataset is empty"),
        (lambda: Dataset.from_dict({"prompt": ["a"]}), ValueError, "has 1 prompts, fewer than the 2"),
        (lambda: list(PROMPTS), TypeError, "must be a datasets.Dataset, got list"),
        (lambda: IterableDataset.from_generator(lambda: iter([{"prompt": "a"}])), NotImplementedError, "Iterable"),
        (lambda: None, ValueError, "train_dataset is required"),
    ],
    ids=["missing_prompt", "empty", "too_small", "not_a_dataset", "iterable", "none"],
)
def test_dataset_errors(model_dir, tmp_path, dataset, error, match):
    with pytest.raises(error, match=match):
        posttrain.GRPOTrainer(model_dir, letters_reward, args=tiny_args(tmp_path), train_dataset=dataset())


def wrong_length(completions, **kwargs):
    return [1.0] * (len(completions) + 1)


def not_numbers(completions, **kwargs):
    return ["good"] * len(completions)


def raises(completions, **kwargs):
    raise ZeroDivisionError("boom")


@pytest.mark.parametrize(
    ("func", "error", "match"),
    [
        (wrong_length, ValueError, "'wrong_length' returned 5 rewards for 4 completions"),
        (not_numbers, TypeError, "'not_numbers' returned 'good' \\(str\\) for completion 0"),
        (raises, RuntimeError, "'raises' raised ZeroDivisionError: boom"),
    ],
    ids=["wrong_length", "not_numbers", "raises"],
)
def test_reward_function_errors(model_dir, tmp_path, func, error, match):
    trainer = posttrain.GRPOTrainer(model_dir, [func], args=tiny_args(tmp_path), train_dataset=standard_dataset())
    with pytest.raises(error, match=match):
        trainer.train()


def test_all_none_rewards_warn_and_give_zero_advantages(model_dir, tmp_path):
    def abstains(completions, **kwargs):
        return [None] * len(completions)

    trainer = posttrain.GRPOTrainer(model_dir, abstains, args=tiny_args(tmp_path), train_dataset=standard_dataset())
    with pytest.warns(UserWarning, match="every reward function returned None or NaN for 4 of 4 completions"):
        trainer.train()
    logs = trainer.state.log_history[0]
    assert torch.equal(trainer._buffered_inputs[0]["advantages"], torch.zeros(4))
    assert logs["reward"] is None and logs["grad_norm"] == 0.0 and logs["loss"] == 0.0


@pytest.mark.parametrize(
    ("overrides", "trainer_kwargs", "error", "match"),
    [
        ({"use_vllm": True}, {}, ImportError, "vllm is not installed"),
        ({}, {"tools": [len]}, NotImplementedError, "tools"),
        ({"reward_weights": [1.0, 2.0]}, {}, ValueError, "reward_weights has 2 weights but there are 1"),
        ({}, {"reward_processing_classes": [None, None]}, ValueError, "2 entries for 1 reward functions"),
    ],
    ids=["vllm_missing", "tools", "weights", "reward_tokenizers"],
)
def test_unsupported_or_inconsistent_options(model_dir, tmp_path, overrides, trainer_kwargs, error, match):
    with pytest.raises(error, match=match):
        posttrain.GRPOTrainer(
            model_dir, letters_reward, args=tiny_args(tmp_path, **overrides), train_dataset=standard_dataset(),
            **trainer_kwargs,
        )  # fmt: skip


def test_reward_functions_by_name_and_completion_logs(model_dir, tmp_path):
    args = tiny_args(tmp_path, log_completions=True, max_completion_length=6)
    trainer = posttrain.GRPOTrainer(
        model_dir, ["think_format_reward", "soft_overlong_punishment", f"{__name__}.letters_reward"], args=args,
        train_dataset=standard_dataset(),
    )  # fmt: skip
    assert trainer.reward_funcs[0] is think_format_reward
    assert trainer.reward_funcs[1].max_completion_len == 6
    assert trainer.reward_func_names == ["think_format_reward", "soft_overlong_punishment_reward", "letters_reward"]
    trainer.train()
    table = __import__("pandas").read_parquet(tmp_path / "completions" / "completions_00001.parquet")
    assert len(table) == 4 and {"prompt", "completion", "advantage", "letters_reward"} <= set(table.columns)
    assert "rewards/soft_overlong_punishment_reward/mean" in trainer.state.log_history[0]


def test_unknown_reward_name_is_a_clear_error(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # fail the reward-model lookup fast
    with pytest.raises(ValueError, match="'acuracy_reward' is not a built-in reward name"):
        posttrain.GRPOTrainer(model_dir, "acuracy_reward", args=tiny_args(tmp_path), train_dataset=standard_dataset())


# ---- data and generation helpers ----


@pytest.mark.parametrize(("n", "mini", "batch", "repeat"), [(7, 2, 3, 4), (10, 3, 2, 1), (5, 2, 5, 2), (4, 8, 1, 3)])
@pytest.mark.parametrize("shuffle", [True, False])
def test_repeat_sampler_matches_trl(n, mini, batch, repeat, shuffle):
    ours = RepeatSampler(range(n), mini, batch, repeat, shuffle=shuffle, seed=3)
    theirs = trl.trainer.utils.RepeatSampler(range(n), mini, batch, repeat, shuffle=shuffle, seed=3)
    for _ in range(2):  # two epochs: the generator state carries over
        order = list(ours)
        assert order == list(theirs) and len(order) == len(ours) == len(theirs)


def test_split_and_shuffle_batch_keep_rows_together():
    batch = {"x": torch.arange(6), "y": [10, 11, 12, 13, 14, 15], "n": torch.tensor(9), "z": None}
    shuffled = shuffle_batch(batch)
    assert [y - 10 for y in shuffled["y"]] == shuffled["x"].tolist() and shuffled["n"] == 9
    parts = split_batch(shuffled, 3)
    assert [p["x"].tolist() for p in parts] == [shuffled["x"][i : i + 2].tolist() for i in (0, 2, 4)]
    assert all(p["n"] == 9 and p["z"] is None for p in parts)
    with pytest.raises(ValueError, match="6 rows cannot be split into 4"):
        split_batch(batch, 4)


def test_truncate_after_eos():
    ids = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [3, 3, 3, 9]])
    assert truncate_after_eos(ids, [2, 9]) == [[5, 2], [5, 6, 7, 8], [3, 3, 3, 9]]


def test_tokenize_prompts_standard_and_conversational():
    tokenizer = byte_level_tokenizer()
    assert tokenize_prompts(tokenizer, ["ab"]) == [tokenizer("ab")["input_ids"]]
    chat = tokenize_prompts(tokenizer, [[{"role": "user", "content": "ab"}]])[0]
    assert tokenizer.decode(chat) == "<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(TypeError, match="a prompt must be a string or a list of chat messages"):
        tokenize_prompts(tokenizer, ["ab", 3])
