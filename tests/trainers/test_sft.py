"""SFTTrainer: parity with TRL 1.16's SFTTrainer (same logged numbers step by step), packing, and bad input.

Every run: tiny Qwen2 (tests/conftest.py), fp32 on the CPU, 3 steps of 2 short examples, no checkpoints.
"""

import functools
import importlib.util
import math
import warnings

import pytest
import torch
import trl
from datasets import Dataset
from moe_utils import ARCHITECTURE_COEF, save_tiny_moe
from transformers import TrainingArguments

import posttrain
from posttrain import SFTConfig, SFTTrainer
from posttrain.data.packing import DataCollatorForLanguageModeling
from posttrain.models import tiny_causal_lm

METRICS = ("loss", "num_tokens", "mean_token_accuracy", "entropy", "grad_norm")
# Relative tolerance against TRL at each of the 3 steps. Step 1 runs the same model on the same batch, and only the
# order of fp32 sums differs (the fused kernel against TRL's chunked head). Steps 2-3 start from weights AdamW moved by
# lr * m / sqrt(v), which could turn rounding-level gradients into lr-sized updates; measured, they stay as close as
# step 1 (<= 2e-7 relative on every metric of every case here), so the step-1 bound holds for all three with a 500x
# margin, while a real divergence (a wrong mask, normalization or token count) moves these numbers by > 1e-2.
RTOL = 1e-4

TEXT = [f"{a} plus {b} is {a + b}." for a, b in [(1, 2), (13, 4), (7, 7), (20, 5), (3, 9), (11, 11), (6, 2), (9, 0)]]
PAIRS = [(f"{a}+{b}=", f"{a + b}") for a, b in [(1, 2), (13, 4), (7, 7), (20, 5), (3, 9), (11, 11), (6, 2), (9, 0)]]


def _text():
    return Dataset.from_dict({"text": TEXT})


def _messages():
    rows = [[{"role": "user", "content": p}, {"role": "assistant", "content": c}] for p, c in PAIRS]
    return Dataset.from_dict({"messages": rows})


def _prompt_completion():
    return Dataset.from_dict({"prompt": [p for p, _ in PAIRS], "completion": [c for _, c in PAIRS]})


def _conversational_prompt_completion():
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] for p, _ in PAIRS],
            "completion": [[{"role": "assistant", "content": c}] for _, c in PAIRS],
        }
    )


def _config(lib, tmp_path, **overrides):
    values = {
        "output_dir": str(tmp_path),
        "max_steps": 3,
        "logging_steps": 1,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "seed": 0,
        "bf16": False,
        "gradient_checkpointing": False,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
    }
    return lib.SFTConfig(**{**values, **overrides})


def _train(lib, model_dir, dataset, tmp_path, **config):
    trainer = lib.SFTTrainer(model=model_dir, args=_config(lib, tmp_path, **config), train_dataset=dataset)
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry], trainer


def _assert_logs_close(actual, expected, metrics=METRICS):
    assert len(actual) == len(expected) == 3
    for step, (ours, theirs) in enumerate(zip(actual, expected), start=1):
        for name in metrics:
            assert math.isclose(ours[name], theirs[name], rel_tol=RTOL, abs_tol=1e-7), (
                f"step {step} {name}: posttrain {ours[name]} vs TRL {theirs[name]}"
            )


# dataset_text_field and formatting_func change only the prepared tokens, compared with TRL's in test_sft_data.py
PARITY_CASES = {
    "messages": (_messages, {}),
    "prompt_completion": (_prompt_completion, {}),
    "prompt_completion-full_loss": (_prompt_completion, {"completion_only_loss": False}),
    "conversational_prompt_completion": (_conversational_prompt_completion, {}),
    "conversational_prompt_completion-full_loss": (_conversational_prompt_completion, {"completion_only_loss": False}),
    "assistant_only_loss": (_messages, {"assistant_only_loss": True}),
    "truncation-keep_start": (_messages, {"max_length": 24}),
    "truncation-keep_end": (_messages, {"max_length": 24, "truncation_mode": "keep_end"}),
    "dft": (_text, {"loss_type": "dft"}),
    "gradient_accumulation": (_text, {"gradient_accumulation_steps": 2}),
    "packing-bfd": (_text, {"packing": True, "max_length": 48, "per_device_train_batch_size": 1}),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_logged_metrics_match_trl(case, tiny_model_dir, tmp_path):
    make_dataset, config = PARITY_CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # keep_end is deprecated in both libraries
        expected, _ = _train(trl, tiny_model_dir, make_dataset(), tmp_path / "trl", **config)
        actual, _ = _train(posttrain, tiny_model_dir, make_dataset(), tmp_path / "posttrain", **config)
    _assert_logs_close(actual, expected)


@pytest.fixture(scope="module")
def text_runs(tiny_model_dir, tmp_path_factory):
    """TRL, posttrain with the fused kernels and posttrain without, trained on the text dataset: logs and weights."""
    runs = {}
    for name, lib, fused in (("trl", trl, True), ("fused", posttrain, True), ("plain", posttrain, False)):
        extra = {} if lib is trl else {"use_fused_kernels": fused}
        logs, trainer = _train(lib, tiny_model_dir, _text(), tmp_path_factory.mktemp(name), **extra)
        runs[name] = (logs, {key: p.detach().clone() for key, p in trainer.model.named_parameters()})
    return runs


def test_text_metrics_match_trl(text_runs):
    _assert_logs_close(text_runs["fused"][0], text_runs["trl"][0])


def test_use_fused_kernels_false_gives_the_same_numbers(text_runs, tiny_model_dir, tmp_path):
    for step, (fused, plain) in enumerate(zip(text_runs["fused"][0], text_runs["plain"][0]), start=1):
        for name in METRICS:
            assert math.isclose(fused[name], plain[name], rel_tol=1e-5, abs_tol=1e-7), (step, name)
    # Weights after AdamW are no fair comparison (it turns rounding-level gradients, like the key biases' exact zeros,
    # into lr-sized steps): compare the gradients of one batch instead
    grads = [_batch_gradients(tiny_model_dir, tmp_path / str(fused), fused) for fused in (True, False)]
    for name, value in grads[0].items():
        torch.testing.assert_close(value, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def _batch_gradients(model_dir, tmp_path, use_fused_kernels):
    trainer = SFTTrainer(
        model_dir, args=_config(posttrain, tmp_path, use_fused_kernels=use_fused_kernels), train_dataset=_messages()
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    trainer.compute_loss(trainer.model, batch).backward()
    return {name: p.grad for name, p in trainer.model.named_parameters()}


def test_parameters_change_after_train(text_runs):
    initial, _ = tiny_causal_lm(seed=0)
    initial = dict(initial.named_parameters())
    trained = text_runs["fused"][1]
    assert trained.keys() == initial.keys()
    for name, value in trained.items():
        assert not torch.equal(value, initial[name].detach()), f"{name} did not change"


def test_gradient_accumulation_normalizes_by_all_accumulated_tokens(tiny_model_dir, tmp_path):
    """2 micro-batches of 2 accumulate to the loss and gradient of one batch of 4: both are normalized by the label
    tokens of all 4 examples (num_items_in_batch), not averaged per micro-batch."""
    dataset = _messages().select([0, 1, 2, 3])  # uneven lengths: per-micro-batch means would differ
    common = {"max_steps": 1, "use_fused_kernels": False}
    whole, _ = _train(posttrain, tiny_model_dir, dataset, tmp_path / "a", per_device_train_batch_size=4, **common)
    split, _ = _train(posttrain, tiny_model_dir, dataset, tmp_path / "b", gradient_accumulation_steps=2, **common)
    assert math.isclose(whole[0]["loss"], split[0]["loss"], rel_tol=1e-5)
    assert math.isclose(whole[0]["grad_norm"], split[0]["grad_norm"], rel_tol=1e-4)


def _split(values, lengths):
    return list(torch.as_tensor(values).split(list(lengths)))


def test_packed_row_gives_the_same_losses_and_gradients_as_its_sequences_unpacked(tiny_model_dir, tmp_path):
    """One bfd-packed row through the trainer (padding-free collation, compute_loss, backward) against the same
    sequences as a padded batch: per-sequence log-probs, the loss and every gradient agree. Attention leaking across
    the packed sequences would change all three."""
    trainer = SFTTrainer(
        tiny_model_dir, args=_config(posttrain, tmp_path, packing=True, max_length=40), train_dataset=_text()
    )
    row = trainer.train_dataset[0]
    assert len(row["seq_lengths"]) > 1
    sequences = [
        {"input_ids": ids.tolist(), "labels": labels.tolist()}
        for ids, labels in zip(_split(row["input_ids"], row["seq_lengths"]), _split(row["labels"], row["seq_lengths"]))
    ]
    padded = DataCollatorForLanguageModeling(pad_token_id=trainer.processing_class.pad_token_id)
    results = []
    for batch in (trainer.data_collator([row]), padded(sequences)):
        assert ("position_ids" in batch) != ("attention_mask" in batch)
        trainer.model.zero_grad()
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        logprobs = trainer.model(**inputs, logprob_labels=batch["labels"]).logprobs
        if "position_ids" in batch:  # one row: drop each sequence's first position (not predicted from the previous)
            per_sequence = [piece[:-1].sum() for piece in _split(logprobs[0].tolist() + [0.0], row["seq_lengths"])]
        else:
            per_sequence = list(logprobs.sum(-1))
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters()}
        results.append((torch.stack([torch.as_tensor(x) for x in per_sequence]), loss.detach(), grads))
    (packed_seq, packed_loss, packed_grads), (single_seq, single_loss, single_grads) = results
    torch.testing.assert_close(packed_seq.float(), single_seq.float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(packed_loss, single_loss, rtol=1e-5, atol=1e-6)
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, single_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _evaluate(lib, model_dir, tmp_path, eval_dataset, **config):
    trainer = lib.SFTTrainer(
        model_dir, args=_config(lib, tmp_path, **config), train_dataset=_text(), eval_dataset=eval_dataset
    )
    return trainer.evaluate()


def test_evaluate_matches_trl(tiny_model_dir, tmp_path):
    expected = _evaluate(trl, tiny_model_dir, tmp_path / "trl", _messages(), per_device_eval_batch_size=4)
    actual = _evaluate(posttrain, tiny_model_dir, tmp_path / "pt", _messages(), per_device_eval_batch_size=4)
    for name in ("eval_loss", "eval_entropy", "eval_mean_token_accuracy", "eval_num_tokens"):
        assert math.isclose(actual[name], expected[name], rel_tol=1e-5, abs_tol=1e-7), name


def test_eval_packing_keeps_packed_sequences_apart(tiny_model_dir, tmp_path):
    """eval_packing=True while training unpacked: the packed eval rows are collated padding-free, so the eval loss is
    the unpacked one (TRL 1.16 pads such rows with a full attention mask and lets their sequences attend to each
    other)."""
    common = {"per_device_eval_batch_size": 8, "max_length": 64, "use_fused_kernels": False}
    unpacked = _evaluate(posttrain, tiny_model_dir, tmp_path / "a", _text(), **common)
    packed = _evaluate(posttrain, tiny_model_dir, tmp_path / "b", _text(), eval_packing=True, **common)
    assert math.isclose(packed["eval_loss"], unpacked["eval_loss"], rel_tol=1e-5)


def test_compute_loss_func_receives_logits_and_num_items(tiny_model_dir, tmp_path):
    seen = {}

    def nll(outputs, labels, num_items_in_batch=None):
        seen["logits"], seen["num_items_in_batch"] = outputs.logits.shape, num_items_in_batch
        logits, targets = outputs.logits[:, :-1], labels[:, 1:]
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="sum") / num_items_in_batch

    args = _config(posttrain, tmp_path, use_fused_kernels=False)
    with pytest.warns(FutureWarning, match="compute_loss_func is deprecated"):
        custom = SFTTrainer(tiny_model_dir, args=args, train_dataset=_messages(), compute_loss_func=nll)
    default = SFTTrainer(tiny_model_dir, args=args, train_dataset=_messages())
    batch = default.data_collator([default.train_dataset[i] for i in range(2)])
    count = (batch["labels"][:, 1:] != -100).sum()
    expected = default.compute_loss(default.model, dict(batch), num_items_in_batch=count)
    actual = custom.compute_loss(custom.model, dict(batch), num_items_in_batch=count)
    assert seen["logits"] == (*batch["input_ids"].shape, 259) and seen["num_items_in_batch"] == count
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_model_instance_and_default_processing_class(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = SFTTrainer(model, args=_config(posttrain, tmp_path), train_dataset=_text())
    assert trainer.model is model
    assert trainer.processing_class.eos_token == "<|im_end|>"
    assert trainer.train_dataset[0]["input_ids"][-1] == 258  # eos appended to the text


def test_args_default_and_training_arguments_conversion(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the default config trains in bf16, which this CPU refuses: keep the default's every other value
    monkeypatch.setattr(SFTTrainer, "config_class", functools.partial(SFTConfig, bf16=False))
    trainer = SFTTrainer(tiny_model_dir, train_dataset=_text())
    assert isinstance(trainer.args, SFTConfig)
    assert trainer.args.output_dir.endswith(tiny_model_dir.rstrip("/").split("/")[-1] + "-SFT")
    assert trainer.args.learning_rate == 2e-5
    monkeypatch.undo()
    plain = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-4, report_to="none", use_cpu=True)
    converted = SFTTrainer(tiny_model_dir, args=plain, train_dataset=_text()).args
    assert isinstance(converted, SFTConfig) and converted.learning_rate == 3e-4 and converted.max_length == 1024


def test_eos_token_and_pad_to_multiple_of(tiny_model_dir, tmp_path):
    args = _config(posttrain, tmp_path, eos_token="<|endoftext|>", pad_to_multiple_of=16)
    trainer = SFTTrainer(tiny_model_dir, args=args, train_dataset=_text())
    assert trainer.model.config.eos_token_id == 256
    assert trainer.model.generation_config.eos_token_id[0] == 256
    assert trainer.train_dataset[0]["input_ids"][-1] == 256
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[1] % 16 == 0


def test_iterable_dataset_trains(tiny_model_dir, tmp_path):
    dataset = _text().to_iterable_dataset()
    logs, _ = _train(posttrain, tiny_model_dir, dataset, tmp_path, use_fused_kernels=False, max_steps=2)
    assert len(logs) == 2 and all(math.isfinite(entry["loss"]) for entry in logs)


def test_skip_prepare_dataset_uses_the_dataset_as_is(tiny_model_dir, tmp_path):
    dataset = Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 4, "labels": [[-100, 2, 3, 4]] * 4})
    args = _config(posttrain, tmp_path, dataset_kwargs={"skip_prepare_dataset": True})
    trainer = SFTTrainer(tiny_model_dir, args=args, train_dataset=dataset)
    assert trainer.train_dataset is dataset
    with pytest.raises(ValueError, match="mask columns but no 'labels'"):
        SFTTrainer(
            tiny_model_dir,
            args=args,
            train_dataset=Dataset.from_dict({"input_ids": [[1, 2]], "completion_mask": [[0, 1]]}),
        )


def test_assistant_only_loss_warns_when_the_end_of_turn_token_is_not_trained(tiny_model_dir, tmp_path):
    from posttrain.models.presets import byte_level_tokenizer

    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}",
        "{% generation %}{{- message['content'] }}{% endgeneration %}{{- '<|im_end|>' }}",
    )
    args = _config(posttrain, tmp_path, assistant_only_loss=True)
    with pytest.warns(UserWarning, match="never learns to stop"):
        SFTTrainer(tiny_model_dir, args=args, train_dataset=_messages(), processing_class=tokenizer)


BAD_INPUTS = {
    "no-known-column": (
        {},
        lambda: Dataset.from_dict({"question": ["a"], "answer": ["b"]}),
        {},
        ValueError,
        r"none of the columns SFT reads.*'input_ids'.*'prompt'.*'messages'.*'text'.*\['answer', 'question'\]",
    ),
    "empty-dataset": ({}, lambda: Dataset.from_dict({"text": []}), {}, ValueError, "train dataset is empty"),
    "no-train-dataset": ({}, lambda: None, {}, ValueError, "train_dataset is required"),
    "list-dataset": ({}, lambda: [{"text": "a"}], {}, TypeError, "must be a datasets.Dataset"),
    "assistant_only_loss-not-conversational": (
        {"assistant_only_loss": True},
        _text,
        {},
        ValueError,
        "needs a conversational dataset",
    ),
    "padding_free-without-packing-with-max_length": (
        {"padding_free": True},
        _text,
        {},
        ValueError,
        "padding_free=True without packing",
    ),
    "padding_free-custom-collator": (
        {"packing": True},
        _text,
        {"data_collator": lambda examples: examples},
        ValueError,
        "custom data_collator",
    ),
    "formatting_func-with-completion_only_loss": (
        {},
        _prompt_completion,
        {"formatting_func": lambda example: example["prompt"]},
        ValueError,
        "completion_only_loss",
    ),
    "vision-dataset": (
        {},
        lambda: Dataset.from_dict({"text": ["a"], "image": [None]}),
        {},
        NotImplementedError,
        "vision",
    ),
    "eos_token-not-in-vocab": (
        {"eos_token": "<eos>"},
        _text,
        {},
        ValueError,
        "eos_token '<eos>' is not in the vocabulary",
    ),
    "pad_token-not-in-vocab": (
        {"pad_token": "<pad>"},
        _text,
        {},
        ValueError,
        "pad_token '<pad>' is not in the vocabulary",
    ),
    "router_aux_loss_coef-dense-model": (
        {"router_aux_loss_coef": 0.01},
        _text,
        {},
        ValueError,
        "not a Mixture-of-Experts model",
    ),
    "dft-with-compute_loss_func": (
        {"loss_type": "dft"},
        _text,
        {"compute_loss_func": lambda *a, **k: 0.0},
        ValueError,
        "loss_type='dft'",
    ),
    "selective-checkpointing": (
        {"gradient_checkpointing_kwargs": {"selective": True}},
        _text,
        {},
        NotImplementedError,
        "selective",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_clear_error(case, tiny_model_dir, tmp_path):
    config, make_dataset, trainer_kwargs, error, message = BAD_INPUTS[case]
    args = _config(posttrain, tmp_path, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=message):
            SFTTrainer(tiny_model_dir, args=args, train_dataset=make_dataset(), **trainer_kwargs)


def test_peft_config_without_peft_is_a_clear_error(tiny_model_dir, tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a))
    with pytest.raises(ImportError, match="needs peft, which is not installed"):
        SFTTrainer(tiny_model_dir, args=_config(posttrain, tmp_path), train_dataset=_text(), peft_config=object())


def test_lora_adapter_matches_trl(tiny_model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    runs = []
    for lib in (trl, posttrain):
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        args = _config(lib, tmp_path / lib.__name__, gradient_checkpointing=True)
        trainer = lib.SFTTrainer(model=tiny_model_dir, args=args, train_dataset=_text(), peft_config=lora)
        trainer.train()
        runs.append((trainer, [entry for entry in trainer.state.log_history if "loss" in entry]))
    (_, expected), (trainer, actual) = runs
    _assert_logs_close(actual, expected)
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)


def test_assistant_only_loss_needs_generation_markers(tiny_model_dir, tmp_path):
    from posttrain.models.presets import byte_level_tokenizer

    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = tokenizer.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    args = _config(posttrain, tmp_path, assistant_only_loss=True)
    with pytest.raises(ValueError, match=r"\{% generation %\}"):
        SFTTrainer(tiny_model_dir, args=args, train_dataset=_messages(), processing_class=tokenizer)


def test_model_init_kwargs_with_a_built_model_warn_as_in_trl(tiny_model_dir, tmp_path):
    model, _ = tiny_causal_lm()
    args = _config(posttrain, tmp_path, model_init_kwargs={"dtype": "bfloat16"})
    with pytest.warns(UserWarning, match=r"model_init_kwargs \['dtype'\] are ignored"):
        trainer = SFTTrainer(model, args=args, train_dataset=_text(), processing_class=posttrain.models.byte_level_tokenizer())
    assert trainer.model.dtype == torch.float32


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("max_length", 0, "max_length must be a positive integer or None, got 0"),
        ("max_length", -5, "max_length must be a positive integer or None, got -5"),
        ("loss_type", "sigmoid", "loss_type 'sigmoid' is not one of: nll, dft"),
        ("packing_strategy", "ffd", "packing_strategy 'ffd' is not one of: bfd, bfd_split, wrapped"),
        ("truncation_mode", "middle", "truncation_mode 'middle' is not one of: keep_start, keep_end"),
        ("pad_to_multiple_of", 0, "pad_to_multiple_of must be a positive integer"),
        ("pad_to_multiple_of", "eight", "pad_to_multiple_of must be an integer, 'auto' or None, got 'eight'"),
    ],
)
def test_config_rejects_bad_values(field, value, message, tmp_path):
    with pytest.raises((ValueError, NotImplementedError), match=message):
        SFTConfig(output_dir=str(tmp_path), bf16=False, **{field: value})


def test_config_defaults_and_deprecated_aliases_match_trl(tmp_path):
    ours, theirs = SFTConfig(output_dir=str(tmp_path), bf16=False), trl.SFTConfig(output_dir=str(tmp_path), bf16=False)
    for name in trl.SFTConfig.__dataclass_fields__:
        assert getattr(ours, name) == getattr(theirs, name), name
    with pytest.warns(FutureWarning):
        assert SFTConfig(output_dir=str(tmp_path), bf16=False, loss_type="chunked_nll").loss_type == "nll"
    with pytest.warns(FutureWarning):
        assert (
            SFTConfig(output_dir=str(tmp_path), bf16=False, packing_strategy="bfd-requeue").packing_strategy
            == "bfd_split"
        )
    assert SFTConfig(output_dir=str(tmp_path), bf16=False, pad_to_multiple_of="64").pad_to_multiple_of == 64
    with pytest.warns(UserWarning, match=r"dataset_kwargs keys \['add_special_tokens'\] are ignored"):
        SFTConfig(output_dir=str(tmp_path), bf16=False, dataset_kwargs={"add_special_tokens": False})


def test_compute_metrics_gets_the_logits(tiny_model_dir, tmp_path):
    seen = {}

    def metrics(prediction):
        seen["logits"], seen["labels"] = prediction.predictions.shape, prediction.label_ids.shape
        return {"seen": 1.0}

    args = _config(posttrain, tmp_path, per_device_eval_batch_size=8, use_fused_kernels=False)
    trainer = SFTTrainer(
        tiny_model_dir, args=args, train_dataset=_text(), eval_dataset=_text(), compute_metrics=metrics
    )
    result = trainer.evaluate()
    assert result["eval_seen"] == 1.0 and math.isfinite(result["eval_loss"])
    assert seen["logits"] == (*seen["labels"], 259)


def test_label_smoothing_uses_the_full_logits(tiny_model_dir, tmp_path):
    from transformers.trainer_pt_utils import LabelSmoother

    args = _config(posttrain, tmp_path, label_smoothing_factor=0.1, use_fused_kernels=False)
    with pytest.warns(FutureWarning, match="label_smoothing_factor is deprecated"):
        trainer = SFTTrainer(tiny_model_dir, args=args, train_dataset=_messages())
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    loss = trainer.compute_loss(trainer.model, dict(batch))
    logits = trainer.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    expected = LabelSmoother(epsilon=0.1)({"logits": logits}, batch["labels"], shift_labels=True)
    torch.testing.assert_close(loss, expected)


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory):
    """TRL and posttrain on the tiny MoE model (router_aux_loss_coef=None: the architecture's 0.05), with gradient
    accumulation (the aux term is a per-micro-batch mean, averaged over the accumulated micro-batches) and TRL's
    default gradient checkpointing (the routers' logits are recorded by hooks, which recomputation must not upset);
    and posttrain with router_aux_loss_coef=0.0 on the same model saved with output_router_logits=True (1 step)."""
    model_dir = save_tiny_moe(tmp_path_factory.mktemp("tiny-moe"))
    off_dir = save_tiny_moe(tmp_path_factory.mktemp("tiny-moe-router-logits-on"), output_router_logits=True)
    common = {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 1, "gradient_checkpointing": True}
    return {
        name: _train(lib, directory, _text(), tmp_path_factory.mktemp(name), **common, **config)
        for name, lib, directory, config in (
            ("trl", trl, model_dir, {}),
            ("posttrain", posttrain, model_dir, {}),
            ("coef0", posttrain, off_dir, {"router_aux_loss_coef": 0.0, "max_steps": 1}),
        )
    }


def test_moe_aux_loss_matches_trl(moe_runs):
    (expected, _), (actual, trainer) = moe_runs["trl"], moe_runs["posttrain"]
    _assert_logs_close(actual, expected, metrics=(*METRICS, "aux_loss"))
    assert trainer.router_aux_loss_coef == ARCHITECTURE_COEF and trainer.aux_loss_enabled
    assert all(1.0 < entry["aux_loss"] < 4.0 for entry in actual)  # 4 experts, top-2: ~2 when balanced


def test_moe_router_aux_loss_coef_zero_adds_no_aux_term(moe_runs):
    (with_aux, _), (without, trainer) = moe_runs["posttrain"], moe_runs["coef0"]
    assert not trainer.aux_loss_enabled and all("aux_loss" not in entry for entry in without)
    # as TRL, the config follows the coefficient: the router logits the model was saved with are turned off
    assert trainer.model.config.output_router_logits is False
    # same weights at step 1: the losses differ by exactly the weighted aux term
    step1_aux = ARCHITECTURE_COEF * with_aux[0]["aux_loss"]
    assert math.isclose(with_aux[0]["loss"] - without[0]["loss"], step1_aux, rel_tol=1e-3)


def test_gradient_checkpointing_gives_the_same_step(tiny_model_dir, tmp_path):
    """TRL's default (gradient_checkpointing=True) recomputes the backbone in the backward through the fused head."""
    runs = [
        _train(posttrain, tiny_model_dir, _text(), tmp_path / str(flag), max_steps=1, gradient_checkpointing=flag)[0]
        for flag in (True, False)
    ]
    for name in METRICS:
        assert math.isclose(runs[0][0][name], runs[1][0][name], rel_tol=1e-5), name
