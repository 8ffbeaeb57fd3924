"""The construction path every trainer shares (posttrain/trainers/base.py): one behaviour for defaults, models,
tokenizers, quantization, Liger, the fused head and the reference model, checked on each trainer."""

import functools
import warnings

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, TrainingArguments

import posttrain
from posttrain import (
    DPOConfig,
    DPOTrainer,
    GRPOConfig,
    GRPOTrainer,
    KTOConfig,
    KTOTrainer,
    RewardConfig,
    RewardTrainer,
    SFTConfig,
    SFTTrainer,
)
from posttrain.models import fused_head_of, tiny_causal_lm
from posttrain.trainers.base import SyncRefModelCallback, model_name

COMMON = dict(
    max_steps=1, logging_steps=1, per_device_train_batch_size=2, learning_rate=1e-3, seed=0, bf16=False,
    gradient_checkpointing=False, report_to="none", save_strategy="no", disable_tqdm=True,
)  # fmt: skip
GRPO_EXTRA = dict(num_generations=2, max_completion_length=4, use_fused_kernels=False)


def _reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


# (trainer class, config class, dataset, extra trainer kwargs, extra config fields)
TRAINERS = {
    "sft": (SFTTrainer, SFTConfig, lambda: Dataset.from_dict({"text": ["1 plus 1 is 2.", "2 plus 2 is 4."]}), {}, {}),
    "dpo": (
        DPOTrainer,
        DPOConfig,
        lambda: Dataset.from_dict({"prompt": ["2+2=", "x"], "chosen": ["4", "y"], "rejected": ["5", "z"]}),
        {},
        {},
    ),
    "grpo": (
        GRPOTrainer,
        GRPOConfig,
        lambda: Dataset.from_dict({"prompt": ["hello", "abc"]}),
        {"reward_funcs": _reward},
        GRPO_EXTRA,
    ),
    "kto": (
        KTOTrainer,
        KTOConfig,
        lambda: Dataset.from_dict({"prompt": ["2+2=", "x"], "completion": ["4", "z"], "label": [True, False]}),
        {},
        {},
    ),
    "reward": (
        RewardTrainer,
        RewardConfig,
        lambda: Dataset.from_dict({"prompt": ["2+2=", "x"], "chosen": ["4", "y"], "rejected": ["5", "z"]}),
        {},
        {},
    ),
}
# The trainers that train a causal LM through the fused log-prob head
LM_TRAINERS = [name for name in TRAINERS if name != "reward"]


def _built_model(name):
    """A freshly built model for trainer `name` (a one-score sequence classifier for the reward trainer)."""
    model, tokenizer = tiny_causal_lm(seed=0)
    if name == "reward":
        from transformers import Qwen2ForSequenceClassification

        model = Qwen2ForSequenceClassification(model.config.__class__(**{**model.config.to_dict(), "num_labels": 1}))
    return model, tokenizer


def _build(name, model, tmp_path, args=..., **kwargs):
    trainer_class, config_class, dataset, extra, config = TRAINERS[name]
    if args is ...:
        args = config_class(output_dir=str(tmp_path), **COMMON, **config)
    return trainer_class(model, args=args, train_dataset=dataset(), **extra, **kwargs)


@pytest.mark.parametrize("name", list(TRAINERS))
def test_default_output_dir_ignores_a_trailing_slash(name, tiny_model_dir, tmp_path, monkeypatch):
    trainer_class, config_class, *_ , config = TRAINERS[name]
    monkeypatch.chdir(tmp_path)
    # the default config trains in bf16, which this CPU refuses: keep the default's every other value
    monkeypatch.setattr(trainer_class, "config_class", functools.partial(config_class, bf16=False, **config))
    args = trainer_class.resolve_args(tiny_model_dir + "/", None)
    assert args.output_dir == f"{model_name(tiny_model_dir)}-{trainer_class.trainer_suffix}"
    assert model_name(tiny_model_dir + "/") == tiny_model_dir.rstrip("/").split("/")[-1] != ""


@pytest.mark.parametrize("name", list(TRAINERS))
def test_training_arguments_are_converted_and_foreign_fields_named(name, tmp_path):
    trainer_class, config_class, *_ = TRAINERS[name]
    # KTO's default sampling is sequential (its KL estimate pairs neighbours); TrainingArguments' is random
    sampling = {"train_sampling_strategy": "sequential"} if name == "kto" else {}
    plain = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-4, report_to="none", use_cpu=True, **sampling)
    converted = trainer_class.resolve_args("m", plain)
    assert isinstance(converted, config_class) and converted.learning_rate == 3e-4
    other = SFTConfig(output_dir=str(tmp_path), bf16=False, max_length=77, **sampling) if name != "sft" else None
    if other is not None:
        with pytest.warns(UserWarning, match=r"fields \[.*'max_length'.*\] are not"):
            trainer_class.resolve_args("m", other)


@pytest.mark.parametrize("name", list(TRAINERS))
def test_quantization_config_with_a_built_model_is_an_error(name, tmp_path):
    model, tokenizer = _built_model(name)
    with pytest.raises(ValueError, match="quantization_config only applies when model is a hub id or a path"):
        _build(name, model, tmp_path, processing_class=tokenizer, quantization_config=object())


@pytest.mark.parametrize("name", LM_TRAINERS)
def test_use_liger_kernel_keeps_the_fused_head(name, tiny_model_dir, tmp_path):
    """With TRL's deprecated use_liger_kernel, Trainer.train() would apply Liger's fused linear cross entropy, which
    replaces the model's forward: every trainer turns that part off (GRPO did not)."""
    pytest.importorskip("liger_kernel")
    trainer_class, config_class, _, _, config = TRAINERS[name]
    args = config_class(output_dir=str(tmp_path), use_liger_kernel=True, **COMMON, **config)
    with pytest.warns(FutureWarning, match="use_liger_kernel=True is deprecated"):
        trainer = _build(name, tiny_model_dir, tmp_path, args=args)
    assert trainer.args.liger_kernel_config == {"fused_linear_cross_entropy": False}
    assert fused_head_of(trainer.policy_lm) is trainer.fused_head


def test_grpo_default_tokenizer_pads_and_truncates_on_the_left(tiny_model_dir, tmp_path):
    trainer = _build("grpo", tiny_model_dir, tmp_path)
    assert trainer.processing_class.padding_side == "left"
    assert trainer.processing_class.truncation_side == "left"
    trainer.save_model(str(tmp_path / "saved"))
    saved = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert (saved.padding_side, saved.truncation_side) == ("left", "left")


@pytest.mark.parametrize("name", list(TRAINERS))
def test_tokenizer_without_pad_or_eos_is_a_clear_error(name, tmp_path):
    model, tokenizer = _built_model(name)
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an eos token: set pad_token"):
        _build(name, model, tmp_path, processing_class=tokenizer)


@pytest.mark.parametrize("name", LM_TRAINERS)
def test_a_model_patched_by_another_trainer_is_taken_over(name, tiny_model_dir, tmp_path):
    model, tokenizer = tiny_causal_lm(seed=0)
    first = _build("sft", model, tmp_path / "first", processing_class=tokenizer)
    second = _build(name, model, tmp_path / "second", processing_class=tokenizer)
    assert fused_head_of(model) is second.fused_head is not first.fused_head
    second.train()


def test_reference_copy_of_a_patched_policy_runs_on_its_own_weights(tmp_path):
    model, tokenizer = tiny_causal_lm(seed=0)
    trainer = _build("dpo", model, tmp_path, processing_class=tokenizer)
    reference = trainer.ref_model
    assert reference is not model and fused_head_of(reference) is not fused_head_of(model)
    ids = torch.randint(0, 259, (2, 7))
    labels = ids.clone()
    with torch.no_grad():
        before = reference(input_ids=ids, logprob_labels=labels).logprobs
        for param in model.parameters():
            param.add_(0.5)
        after = reference(input_ids=ids, logprob_labels=labels).logprobs
        moved = model(input_ids=ids, logprob_labels=labels).logprobs
    torch.testing.assert_close(after, before)
    assert not torch.allclose(moved, before)


def test_sync_ref_model_mixes_in_the_reference_dtype_and_pairs_strictly():
    policy, _ = tiny_causal_lm(seed=0)
    reference, _ = tiny_causal_lm(seed=1)
    reference = reference.to(torch.float64)
    expected = [0.25 * p.double() + 0.75 * r for p, r in zip(policy.parameters(), reference.parameters())]
    SyncRefModelCallback.mix(policy, reference, alpha=0.25)
    for got, want in zip(reference.parameters(), expected):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want)
    shallower, _ = tiny_causal_lm(seed=2, num_hidden_layers=1)
    with pytest.raises(ValueError, match="zip"):  # paired in order: a missing layer is an error, not a silent skip
        SyncRefModelCallback.mix(shallower, policy, alpha=0.5)


def test_lazy_names_cover_every_trainer():
    for name in ("SFTTrainer", "DPOTrainer", "GRPOTrainer"):
        assert issubclass(getattr(posttrain, name), posttrain.trainers.base.PosttrainTrainer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SFTConfig(output_dir="unused", bf16=False)  # no deprecation warning the user cannot act on


@pytest.mark.parametrize("name", list(TRAINERS))
def test_activation_offloading_and_tiled_mlp_leave_the_training_unchanged(name, tiny_model_dir, tmp_path):
    """Offloading moves the saved activations to CPU memory and back: bit-identical steps. Tiled MLPs recompute
    each tile in backward: the same steps up to fp32 summation order."""
    trainer_class, config_class, _, _, config = TRAINERS[name]
    runs = {}
    for option in ("plain", "activation_offloading", "tiled_mlp"):
        extra = {} if option == "plain" else {option: True, "tiled_mlp_tile_tokens": 5}
        args = config_class(output_dir=str(tmp_path / option), **{**COMMON, "max_steps": 2}, **config, **extra)
        trainer = _build(name, tiny_model_dir, tmp_path, args=args)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        runs[option] = (losses, torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
        if option == "activation_offloading":
            assert trainer._offload_context.offloaded_tensors > 0
    plain_losses, plain_params = runs["plain"]
    assert runs["activation_offloading"][0] == plain_losses
    assert torch.equal(runs["activation_offloading"][1], plain_params)
    torch.testing.assert_close(runs["tiled_mlp"][0], plain_losses, rtol=1e-5, atol=1e-6)
    # Adam turns a near-zero gradient's rounding difference into a step of up to ~lr (1e-3): with several intra-op
    # threads a few weights differ by ~1e-5, where a tile's missing or wrong gradient moves them by ~lr
    torch.testing.assert_close(runs["tiled_mlp"][1], plain_params, rtol=1e-4, atol=1e-4)
