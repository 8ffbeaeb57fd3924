"""RewardTrainer: parity with TRL 1.16's RewardTrainer (the same logged values at each of the first 3 steps) over its
options and dataset formats, LoRA, padding-free batches, the saved model, and bad input.

Every run: the tiny Qwen2 of tests/conftest.py loaded as a sequence classifier (num_labels=1, its score head drawn
after set_seed), fp32 on the CPU, 4 short pairs, batches of 2, 3 steps. Runs are cached per configuration, so a TRL
run (or a posttrain run) is shared by every test that needs it.
"""

import dataclasses
import math
import warnings

import pytest
import torch
import trl
from datasets import Dataset, IterableDataset
from testing_utils import assert_same_logs, logged_close
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

import posttrain
from posttrain import RewardConfig, RewardTrainer
from posttrain.configs.base import PosttrainConfig
from posttrain.data.reward import DataCollatorForPackedPreference
from posttrain.models import tiny_causal_lm, tiny_qwen2_config

# Padded batches run TRL's exact computation: measured, every logged value of every padded case (LoRA included) equals
# TRL's to the last bit at all 3 steps. Padding-free batches run the same sequences through another attention layout
# (one packed row), which changes the order of fp32 sums: 2e-7 relative at step 1; later steps start from weights Adam
# moved by lr * m / sqrt(v), where coordinates whose gradient sits near Adam's eps turn 1e-7 gradient differences into
# larger weight differences: 2.1e-5 relative (values >= 0.1) and 1.4e-7 absolute (values < 0.1) at steps 2-3. A real
# mismatch (a wrong token read, a missing EOS, a sign or a term) moves these values by > 1e-2.
STEP1_RTOL, STEP1_ATOL = 1e-4, 1e-6
LATER_RTOL, LATER_ATOL = 1e-3, 1e-4

PAIRS = [("2+2=", "4", "5"), ("The sky is", " blue", " green"), ("Hi", " there", " you!"), ("x", "y z", "q")]
MARGINS = [0.5, 1.0, 0.0, 2.0]


def _user(text):
    return [{"role": "user", "content": text}]


def _assistant(text):
    return [{"role": "assistant", "content": text.strip()}]


def _columns(make_prompt, make_completion, implicit=False, margin=False):
    if implicit:
        columns = {
            "chosen": [make_prompt(p) + make_completion(c) for p, c, _ in PAIRS],
            "rejected": [make_prompt(p) + make_completion(r) for p, _, r in PAIRS],
        }
    else:
        columns = {
            "prompt": [make_prompt(p) for p, _, _ in PAIRS],
            "chosen": [make_completion(c) for _, c, _ in PAIRS],
            "rejected": [make_completion(r) for _, _, r in PAIRS],
        }
    return Dataset.from_dict({**columns, **({"margin": MARGINS} if margin else {})})


DATASETS = {
    "standard": lambda: _columns(str, str),
    "implicit": lambda: _columns(str, str, implicit=True),
    "margin": lambda: _columns(str, str, margin=True),
    "conversational": lambda: _columns(_user, _assistant),
    "conversational_implicit": lambda: _columns(_user, _assistant, implicit=True),
    "conversational_margin": lambda: _columns(_user, _assistant, margin=True),
}

BASE_CONFIG = {
    "max_steps": 3, "logging_steps": 1, "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2,
    "learning_rate": 1e-2, "seed": 0, "bf16": False, "gradient_checkpointing": False, "report_to": "none",
    "save_strategy": "no", "disable_tqdm": True,
}  # fmt: skip
METRICS = {"loss", "grad_norm", "num_tokens", "min_reward", "mean_reward", "max_reward", "accuracy", "margin"}


@dataclasses.dataclass
class Run:
    logs: list[dict]
    eval_metrics: dict | None
    trainer: object


@pytest.fixture(scope="module")
def train(tiny_model_dir, tmp_path_factory):
    """train(lib, data="standard", evaluate=False, peft=False, **config) -> Run, cached per arguments.
    peft: train a LoRA adapter (task_type SEQ_CLS, so the score head is trained whole)."""
    cache = {}

    def run(lib: str, data: str = "standard", evaluate: bool = False, peft: bool = False, **config) -> Run:
        key = (lib, data, evaluate, peft, repr(sorted(config.items())))
        if key not in cache:
            module = trl if lib == "trl" else posttrain
            args = module.RewardConfig(output_dir=str(tmp_path_factory.mktemp("reward")), **{**BASE_CONFIG, **config})
            extra = {"peft_config": _lora()} if peft else {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                trainer = module.RewardTrainer(
                    tiny_model_dir, args=args, train_dataset=DATASETS[data](),
                    eval_dataset=DATASETS[data]() if evaluate else None, **extra,
                )  # fmt: skip
            trainer.train()
            logs = [entry for entry in trainer.state.log_history if "loss" in entry]
            cache[key] = Run(logs, trainer.evaluate() if evaluate else None, trainer)
        return cache[key]

    return run


def _lora():
    peft = pytest.importorskip("peft")
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")


def _close(ours: float, theirs: float, step: int) -> bool:
    return logged_close(ours, theirs, step, step1=(STEP1_RTOL, STEP1_ATOL), later=(LATER_RTOL, LATER_ATOL))


def _assert_same_logs(ours: list[dict], theirs: list[dict]) -> None:
    assert_same_logs(ours, theirs, step1=(STEP1_RTOL, STEP1_ATOL), later=(LATER_RTOL, LATER_ATOL))


def _case(case_id, data="standard", slow=False, ours=None, **config):
    marks = [pytest.mark.slow] if slow else []
    return pytest.param(data, config, ours or {}, id=case_id, marks=marks)


# (dataset, config for both, posttrain-only config)
PARITY_CASES = [
    _case("standard"),
    _case("implicit-prompt", data="implicit"),
    _case("conversational", data="conversational"),
    _case("conversational-implicit-prompt", data="conversational_implicit"),
    _case("margin", data="margin"),
    _case("center-rewards", center_rewards_coefficient=0.1),
    _case("margin-and-center-rewards-conversational", data="conversational_margin", center_rewards_coefficient=0.01),
    _case("gradient-accumulation", gradient_accumulation_steps=2, per_device_train_batch_size=1),
    _case("max-length-drops-long-pairs", max_length=14),
    # the pad token becomes the appended EOS: each reward is then read at the token before it
    _case("eos-token-is-pad-token", eos_token="<|endoftext|>"),
    _case("pad-token", pad_token="<|im_start|>"),
    _case("padding-free", data="margin", ours={"padding_free": True}, center_rewards_coefficient=0.01),
    _case("padding-free-eos-is-pad", ours={"padding_free": True}, eos_token="<|endoftext|>"),
    _case("padding-free-pad-to-multiple", ours={"padding_free": True}, pad_to_multiple_of=16),
    # TRL 1.16's offloading fails on a CPU-only machine (it reads the accelerator's type): compared without it
    _case("activation-offloading", ours={"activation_offloading": True}),
    _case("tiled-mlp", ours={"tiled_mlp": True, "tiled_mlp_tile_tokens": 8}),
    _case("gradient-checkpointing", gradient_checkpointing=True, slow=True),
    _case("pad-to-multiple", pad_to_multiple_of=16, slow=True),
]


@pytest.mark.parametrize("data, config, ours", PARITY_CASES)
def test_logged_values_match_trl(train, data, config, ours):
    theirs = train("trl", data, **config)
    mine = train("posttrain", data, **config, **ours)
    assert set(mine.logs[0]) - {"learning_rate", "epoch", "step"} == METRICS
    _assert_same_logs(mine.logs, theirs.logs)


def test_activation_offloading_moves_activations(train):
    offloading = train("posttrain", activation_offloading=True).trainer._offload_context
    assert offloading is not None and offloading.offloaded_bytes > 0


def test_max_length_drops_pairs_as_trl(train):
    theirs = train("trl", max_length=14).trainer.train_dataset
    ours = train("posttrain", max_length=14).trainer.train_dataset
    assert len(ours) == len(theirs) < len(PAIRS)
    assert ours["chosen_ids"] == theirs["chosen_ids"] and ours["rejected_ids"] == theirs["rejected_ids"]


def test_lora_matches_trl(train):
    theirs, ours = train("trl", peft=True), train("posttrain", peft=True)
    _assert_same_logs(ours.logs, theirs.logs)
    trainable = {name for name, param in ours.trainer.model.named_parameters() if param.requires_grad}
    assert any("lora_A" in name for name in trainable) and any(".score." in name for name in trainable)


def test_evaluation_matches_trl(train):
    theirs = train("trl", "margin", evaluate=True).eval_metrics
    ours = train("posttrain", "margin", evaluate=True).eval_metrics
    timing = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}
    assert ours.keys() == theirs.keys()
    assert {"eval_loss", "eval_accuracy", "eval_margin", "eval_mean_reward"} <= ours.keys()
    bad = {key: (ours[key], theirs[key]) for key in theirs.keys() - timing if not _close(ours[key], theirs[key], 3)}
    assert not bad


def test_predictions_are_the_rewards(train):
    """Trainer.predict returns each sequence's reward, batch by batch [2B, 1] (chosen first), in both layouts."""
    for ours in ({}, {"padding_free": True}):
        trainer = train("posttrain", "margin", **ours).trainer
        predictions = torch.as_tensor(trainer.predict(trainer.train_dataset).predictions)
        assert predictions.shape == (2 * len(PAIRS), 1)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
        trainer.model.eval()
        with torch.no_grad():
            expected = trainer.model(input_ids=_padded(batch, trainer.processing_class.pad_token_id)).logits
        torch.testing.assert_close(predictions[:4], expected, rtol=1e-5, atol=1e-6)


def _padded(batch: dict, pad_token_id: int) -> torch.Tensor:
    if "sequence_lengths" not in batch:
        return batch["input_ids"]
    return torch.nn.utils.rnn.pad_sequence(
        batch["input_ids"][0].split(batch["sequence_lengths"].tolist()), batch_first=True, padding_value=pad_token_id
    )


def test_parameters_change(train, tiny_model_dir):
    trainer = train("posttrain").trainer
    initial = dict(_initial_classifier(tiny_model_dir).named_parameters())
    unchanged = [name for name, param in trainer.model.named_parameters() if torch.equal(param, initial[name])]
    assert not unchanged, f"parameters not updated by train(): {unchanged}"


def _initial_classifier(model_dir):
    from transformers import set_seed

    set_seed(0)  # the score head the trainer (and TRL) drew
    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)


def test_saved_model_is_the_trained_classifier(train, tmp_path):
    trainer = train("posttrain", "margin").trainer
    trainer.save_model(str(tmp_path))
    loaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded.config.num_labels == 1 and loaded.config.pad_token_id == tokenizer.pad_token_id
    torch.testing.assert_close(loaded.score.weight, trainer.model.score.weight, rtol=0, atol=0)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_saved_lora_adapter_keeps_the_score_head(train, tmp_path):
    peft = pytest.importorskip("peft")
    trainer = train("posttrain", peft=True).trainer
    trainer.save_model(str(tmp_path))
    config = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert config.task_type == "SEQ_CLS" and "score" in config.modules_to_save
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert any(name.endswith("score.weight") for name in saved) and any("lora_A" in name for name in saved)


def test_padding_free_batch_gives_the_padded_loss_metrics_and_gradients(tiny_model_dir, tmp_path):
    """One batch through compute_loss, packed into a single row vs padded: the same loss, metrics and gradients."""
    results = []
    for padding_free in (False, True):
        args = RewardConfig(output_dir=str(tmp_path), center_rewards_coefficient=0.1, padding_free=padding_free,
                            **BASE_CONFIG)  # fmt: skip
        trainer = RewardTrainer(tiny_model_dir, args=args, train_dataset=DATASETS["margin"]())
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
        assert ("position_ids" in batch) == padding_free
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
        results.append((loss.detach(), metrics, {n: p.grad.clone() for n, p in trainer.model.named_parameters()}))
    (padded_loss, padded_metrics, padded_grads), (packed_loss, packed_metrics, packed_grads) = results
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    assert packed_metrics.keys() == padded_metrics.keys()
    for key in padded_metrics:
        assert math.isclose(packed_metrics[key], padded_metrics[key], rel_tol=1e-5, abs_tol=1e-6), key
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_in_memory_classifier_and_iterable_dataset(tmp_path):
    """A classifier built in memory with its tokenizer, trained on a streamed dataset (max_steps bounds it)."""
    _, tokenizer = tiny_causal_lm(seed=0)
    config = tiny_qwen2_config()
    config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(config)
    stream = IterableDataset.from_generator(lambda: iter(DATASETS["margin"]()))
    args = RewardConfig(output_dir=str(tmp_path), **{**BASE_CONFIG, "max_steps": 2})
    trainer = RewardTrainer(model, args=args, train_dataset=stream, processing_class=tokenizer)
    before = model.score.weight.detach().clone()
    trainer.train()
    assert not torch.equal(model.score.weight, before)
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_peft_model_given_built(tiny_model_dir, tmp_path):
    """A PeftModel of a classifier, built by the user, trains as is (its adapter and score head move)."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_initial_classifier(tiny_model_dir), _lora())
    before = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
    args = RewardConfig(output_dir=str(tmp_path), **{**BASE_CONFIG, "max_steps": 1})
    RewardTrainer(model, args=args, train_dataset=DATASETS["standard"]()).train()
    moved = [
        name for name, param in model.named_parameters() if name in before and not torch.equal(param, before[name])
    ]
    assert any("lora_B" in name for name in moved) and any(".score." in name for name in moved)
    assert not hasattr(model, "generation_config")  # the eos/pad sync's stand-in is gone again


def test_config_fields_and_defaults_match_trl():
    theirs = trl.RewardConfig(output_dir="unused", bf16=False)
    ours = RewardConfig(output_dir="unused", bf16=False)
    for field in dataclasses.fields(theirs):
        assert getattr(ours, field.name) == getattr(theirs, field.name), field.name
    assert RewardConfig.__dataclass_fields__["bf16"].default is None
    # beyond TRL's: posttrain's own fields (PosttrainConfig's, and padding_free)
    posttrain_own = (_field_names(PosttrainConfig) - _field_names(TrainingArguments)) | {"padding_free"}
    assert _field_names(RewardConfig) - _field_names(trl.RewardConfig) == posttrain_own - _field_names(trl.RewardConfig)
    assert (ours.learning_rate, ours.logging_steps, ours.gradient_checkpointing) == (1e-4, 10, True)


def _field_names(config_class) -> set[str]:
    return {field.name for field in dataclasses.fields(config_class)}


@pytest.mark.parametrize(
    "config, match",
    [
        ({"center_rewards_coefficient": -0.01}, "center_rewards_coefficient must be None or a finite number >= 0"),
        ({"center_rewards_coefficient": float("nan")}, "center_rewards_coefficient .* got nan"),
        ({"max_length": 0}, "max_length must be a positive integer or None, got 0"),
        ({"pad_to_multiple_of": 0}, "pad_to_multiple_of must be a positive integer or None, got 0"),
        ({"pad_to_multiple_of": "eight"}, "pad_to_multiple_of must be an integer, 'auto' or None, got 'eight'"),
        ({"dataset_num_proc": 0}, "dataset_num_proc must be a positive integer or None, got 0"),
    ],
    ids=lambda value: None if isinstance(value, dict) else "",
)
def test_config_rejects_bad_values(config, match):
    with pytest.raises(ValueError, match=match):
        RewardConfig(output_dir="unused", bf16=False, **config)


def test_pad_token_is_deprecated():
    with pytest.warns(FutureWarning, match="pad_token is deprecated"):
        RewardConfig(output_dir="unused", bf16=False, pad_token="<|endoftext|>")


def test_training_arguments_are_converted(tmp_path):
    plain = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-4, report_to="none", use_cpu=True)
    converted = RewardTrainer.resolve_args("m", plain)
    assert isinstance(converted, RewardConfig) and converted.learning_rate == 3e-4


def _trainer(model, tmp_path, dataset, **kwargs):
    args = RewardConfig(output_dir=str(tmp_path), **BASE_CONFIG)
    return RewardTrainer(model, args=args, train_dataset=dataset, **kwargs)


def test_missing_column_is_named(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"no 'rejected' column \(found: chosen, completion, prompt\)"):
        _trainer(tiny_model_dir, tmp_path, Dataset.from_dict({"prompt": ["a"], "completion": ["b"], "chosen": ["c"]}))


def test_unpaired_data_is_refused(tiny_model_dir, tmp_path):
    data = Dataset.from_dict({"prompt": ["a"], "completion": ["b"], "label": [True]})
    with pytest.raises(ValueError, match="no 'chosen' or 'rejected' column"):
        _trainer(tiny_model_dir, tmp_path, data)


def test_mixed_text_and_messages_are_refused(tiny_model_dir, tmp_path):
    data = Dataset.from_dict({"prompt": ["2+2="], "chosen": [_assistant("4")], "rejected": [_assistant("5")]})
    with pytest.raises(ValueError, match="train dataset row 0: 'chosen', 'rejected' are lists of chat messages"):
        _trainer(tiny_model_dir, tmp_path, data)


def test_empty_sequence_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="row 0: the 'rejected' sequence is empty"):
        _trainer(tiny_model_dir, tmp_path, Dataset.from_dict({"chosen": ["a"], "rejected": [""]}))


def test_every_pair_too_long_is_an_error(tiny_model_dir, tmp_path):
    args = RewardConfig(output_dir=str(tmp_path), max_length=3, **BASE_CONFIG)
    with pytest.raises(ValueError, match=r"every pair of the train dataset \(4\) .* max_length=3"):
        RewardTrainer(tiny_model_dir, args=args, train_dataset=DATASETS["standard"]())


def test_missing_margin_value_is_named(tiny_model_dir, tmp_path):
    data = Dataset.from_dict({"chosen": ["a", "b"], "rejected": ["c", "d"], "margin": [1.0, None]})
    trainer = _trainer(tiny_model_dir, tmp_path, data)
    with pytest.raises(ValueError, match=r"'margin' column holds None in this batch \(\[1.0, None\]\)"):
        trainer.train()


def test_causal_lm_instance_is_refused(tmp_path):
    model, tokenizer = tiny_causal_lm(seed=0)
    with pytest.raises(ValueError, match=r"Qwen2ForCausalLM\) has num_labels=2, but a reward model outputs one score"):
        _trainer(model, tmp_path, DATASETS["standard"](), processing_class=tokenizer)


def test_lora_without_the_score_head_warns(tiny_model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    with pytest.warns(UserWarning, match="leaves the reward head .* frozen at its random initialization"):
        _trainer(tiny_model_dir, tmp_path, DATASETS["standard"](), peft_config=lora)


def test_padding_free_without_a_score_head_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    load = AutoModelForSequenceClassification.from_pretrained
    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", _without_score(load))
    args = RewardConfig(output_dir=str(tmp_path), padding_free=True, **BASE_CONFIG)
    with pytest.raises(ValueError, match="padding_free=True needs a classifier whose output layer is `score`"):
        RewardTrainer(tiny_model_dir, args=args, train_dataset=DATASETS["standard"]())


def _without_score(load):
    def loader(*args, **kwargs):
        model = load(*args, **kwargs)
        model.classifier = model.score
        del model.score
        return model

    return loader


def test_packed_collator_is_used_with_padding_free(train):
    trainer = train("posttrain", "margin", padding_free=True).trainer
    assert isinstance(trainer.data_collator, DataCollatorForPackedPreference)
    assert trainer.model.config._attn_implementation in ("sdpa", "flash_attention_2", "posttrain_varlen")
