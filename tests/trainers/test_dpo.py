"""DPOTrainer: parity with TRL 1.16's DPOTrainer (the same logged values at each of the first 3 steps) for every loss
type and option, the fused and plain paths, padding-free packing, the reference model, and bad input.

Every run: the tiny Qwen2 of tests/conftest.py, fp32 on the CPU, 4 short pairs, batches of 2, 3 steps. Runs are
cached per configuration, so a TRL run (or a posttrain run) is shared by every test that needs it.
"""

import dataclasses
import importlib.util
import math

import pytest
import torch
import trl
from datasets import Dataset
from moe_utils import ARCHITECTURE_COEF, save_tiny_moe
from testing_utils import assert_same_logs, logged_close

import posttrain
from posttrain import DPOConfig, DPOTrainer
from posttrain.models import tiny_causal_lm
from posttrain.ops.dpo_loss import LOSS_TYPES

# Step 1 runs the same weights on the same batch: only the order of fp32 sums differs (the fused kernel vs TRL's
# chunked head), a few 1e-7 relative, and rewards are exactly 0 (policy == reference). Later steps start from
# weights Adam moved by lr * m / sqrt(v): coordinates whose gradient sits near Adam's eps turn 1e-7 gradient
# differences into ~1e-5 relative weight differences. Metrics that are small differences of large numbers inherit
# an absolute, not relative, error: rewards are beta times differences of log-probs of size ~30, logits/* are
# vocabulary means (~0.01) of logits of size ~1. Worst seen over the whole matrix (slow cases included): 5e-7
# relative at step 1; 2.1e-4 relative (values >= 0.1) and 2.5e-5 absolute (values < 0.1, IPO's large gradients) at
# steps 2-3. A real mismatch (a wrong mask, length, weight or sign) moves these values by > 1e-2.
STEP1_RTOL, STEP1_ATOL = 1e-4, 1e-6
LATER_RTOL, LATER_ATOL = 1e-3, 1e-4

PAIRS = [("2+2=", "4", "5"), ("The sky is", " blue", " green"), ("Hi", " there", " you!"), ("x", "y z", "q")]


def _user(text):
    return [{"role": "user", "content": text}]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


def _columns(make_prompt, make_completion, implicit=False):
    if implicit:
        return {
            "chosen": [make_prompt(p) + make_completion(c) for p, c, _ in PAIRS],
            "rejected": [make_prompt(p) + make_completion(r) for p, _, r in PAIRS],
        }
    return {
        "prompt": [make_prompt(p) for p, _, _ in PAIRS],
        "chosen": [make_completion(c) for _, c, _ in PAIRS],
        "rejected": [make_completion(r) for _, _, r in PAIRS],
    }


DATASETS = {
    "standard": lambda: Dataset.from_dict(_columns(str, str)),
    "implicit": lambda: Dataset.from_dict(_columns(str, str, implicit=True)),
    "conversational": lambda: Dataset.from_dict(_columns(_user, lambda c: _assistant(c.strip()))),
    "conversational_implicit": lambda: Dataset.from_dict(
        _columns(_user, lambda c: _assistant(c.strip()), implicit=True)
    ),
}

BASE_CONFIG = dict(
    max_steps=3, logging_steps=1, per_device_train_batch_size=2, per_device_eval_batch_size=2, learning_rate=1e-2,
    seed=0, bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no", disable_tqdm=True,
)  # fmt: skip
ALL_LOSS_WEIGHTS = [1.0, 0.5, 0.01, 2.0, 1.0, 0.3, 1.0, 0.01, 1.0, 0.7, 1.0, 1.0, 0.2, 0.1, 1.5]
LOSS_OPTIONS = {"exo_pair": {"label_smoothing": 1e-3}, "robust": {"label_smoothing": 0.1}}


@dataclasses.dataclass
class Run:
    logs: list[dict]
    eval_metrics: dict | None
    trainer: object


@pytest.fixture(scope="module")
def train(tiny_model_dir, tmp_path_factory):
    """train(lib, data="standard", evaluate=False, model=None, model_dir=None, **config) -> Run, cached per arguments.
    model: an in-memory (model, tokenizer); model_dir: a saved model other than the tiny Qwen2."""
    cache = {}

    def run(lib: str, data: str = "standard", evaluate: bool = False, model=None, model_dir=None, **config) -> Run:
        key = (lib, data, evaluate, model is not None, model_dir, repr(sorted(config.items())))
        if key not in cache:
            module = trl if lib == "trl" else posttrain
            args = module.DPOConfig(output_dir=str(tmp_path_factory.mktemp("dpo")), **{**BASE_CONFIG, **config})
            extra = {"processing_class": model[1]} if model is not None else {}
            trainer = module.DPOTrainer(
                (model_dir or tiny_model_dir) if model is None else model[0], args=args, train_dataset=DATASETS[data](),
                eval_dataset=DATASETS[data]() if evaluate else None, **extra,
            )  # fmt: skip
            trainer.train()
            logs = [entry for entry in trainer.state.log_history if "loss" in entry]
            cache[key] = Run(logs, trainer.evaluate() if evaluate else None, trainer)
        return cache[key]

    return run


def _close(ours: float, theirs: float, step: int) -> bool:
    return logged_close(ours, theirs, step, step1=(STEP1_RTOL, STEP1_ATOL), later=(LATER_RTOL, LATER_ATOL))


def _assert_same_logs(ours: list[dict], theirs: list[dict]) -> None:
    assert_same_logs(ours, theirs, step1=(STEP1_RTOL, STEP1_ATOL), later=(LATER_RTOL, LATER_ATOL))


def test_lora_adapter_with_disabled_adapter_reference_matches_trl(tiny_model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    runs = []
    for module in (trl, posttrain):
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        args = module.DPOConfig(output_dir=str(tmp_path / module.__name__), **BASE_CONFIG)
        trainer = module.DPOTrainer(tiny_model_dir, args=args, train_dataset=DATASETS["standard"](), peft_config=lora)
        trainer.train()
        runs.append((trainer, [entry for entry in trainer.state.log_history if "loss" in entry]))
    (_, theirs), (trainer, ours) = runs
    _assert_same_logs(ours, theirs)
    assert trainer.ref_model is None  # the reference is the model with its adapter disabled
    assert ours[-1]["rewards/margins"] != 0.0


def _case(case_id, data="standard", fused=True, slow=False, **config):
    marks = [pytest.mark.slow] if slow else []
    return pytest.param(data, fused, config, id=case_id, marks=marks)


PARITY_CASES = [
    _case("sigmoid-standard"),
    _case("sigmoid-conversational", data="conversational"),
    _case("sigmoid-implicit-prompt", data="implicit"),
    _case("conversational-implicit-prompt", data="conversational_implicit", slow=True),
    _case("gradient-checkpointing", gradient_checkpointing=True, slow=True),
    _case("all-loss-types-weighted", loss_type=list(LOSS_TYPES), loss_weights=ALL_LOSS_WEIGHTS, label_smoothing=0.1),
    _case("mpo-weights-plain", fused=False, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    _case(
        "alpha-divergence",
        loss_type=["sigmoid", "sigmoid_norm", "discopop"],
        f_divergence_type="alpha_divergence",
        f_alpha_divergence_coef=0.3,
    ),
    _case("forward-kl-plain", fused=False, f_divergence_type="forward_kl", loss_type=["hinge", "ipo"]),
    _case(
        "js-divergence-plain",
        fused=False,
        f_divergence_type="js_divergence",
        loss_type=["robust", "exo_pair"],
        label_smoothing=0.1,
    ),
    _case("forward-kl", f_divergence_type="forward_kl", slow=True),
    _case("js-divergence", f_divergence_type="js_divergence", slow=True),
    _case("ld-alpha-with-sft", ld_alpha=0.5, loss_type=["sigmoid", "sft"]),
    _case("wpo", use_weighting=True, loss_type=["sigmoid", "ipo"]),
    _case("wpo-plain", fused=False, use_weighting=True),
    _case("precompute-ref", precompute_ref_log_probs=True),
    _case("precompute-ref-batch-4", precompute_ref_log_probs=True, precompute_ref_batch_size=4, slow=True),
    _case("tr-dpo-sync-every-step", sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5),
    _case("padding-free", padding_free=True),
    _case("truncation-keep-start", max_length=12),
    _case("truncation-keep-end", max_length=12, truncation_mode="keep_end", slow=True),
    *[_case(f"{name}-plain", fused=False, loss_type=name, **LOSS_OPTIONS.get(name, {})) for name in LOSS_TYPES],
    *[_case(name, slow=True, loss_type=name, **LOSS_OPTIONS.get(name, {})) for name in LOSS_TYPES],
]


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("data, fused, config", PARITY_CASES)
def test_logged_values_match_trl(train, data, fused, config):
    theirs = train("trl", data, **config)
    ours = train("posttrain", data, **config, **({} if fused else {"use_fused_kernels": False}))
    _assert_same_logs(ours.logs, theirs.logs)


def test_evaluation_matches_trl(train):
    theirs = train("trl", evaluate=True).eval_metrics
    ours = train("posttrain", evaluate=True).eval_metrics
    timing = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}
    assert ours.keys() == theirs.keys()
    bad = {key: (ours[key], theirs[key]) for key in theirs.keys() - timing if not _close(ours[key], theirs[key], 3)}
    assert not bad
    assert "eval_rewards/margins" in ours and "eval_mean_token_accuracy" in ours


def test_fused_and_plain_paths_give_the_same_numbers(train):
    fused, plain = train("posttrain").logs, train("posttrain", use_fused_kernels=False).logs
    for step, (a, b) in enumerate(zip(fused, plain), start=1):
        bad = {key: (a[key], b[key]) for key in a if not _close(a[key], b[key], step)}
        assert not bad, f"step {step}: {bad}"


def test_parameters_change_and_reference_stays(train, tiny_model_dir):
    trainer = train("posttrain").trainer
    initial = {name: param for name, param in type(trainer.model).from_pretrained(tiny_model_dir).named_parameters()}
    unchanged = [name for name, param in trainer.model.named_parameters() if torch.equal(param, initial[name])]
    assert not unchanged, f"parameters not updated by train(): {unchanged}"
    for name, param in trainer.ref_model.named_parameters():
        assert torch.equal(param, initial[name]), f"reference parameter {name} changed"


def test_in_memory_model_trains_against_a_copy_of_itself(train):
    """An in-memory model (no path to reload a reference from) is deep-copied into the reference: the same numbers
    as loading both from disk."""
    model, tokenizer = tiny_causal_lm(seed=0)
    run = train("posttrain", model=(model, tokenizer))
    assert run.trainer.ref_model is not run.trainer.model
    assert not any(p.requires_grad for p in run.trainer.ref_model.parameters())
    _assert_same_logs(run.logs, train("trl").logs)


@pytest.fixture(scope="module")
def moe_model_dir(tmp_path_factory):
    return save_tiny_moe(tmp_path_factory.mktemp("tiny-moe"))


def test_moe_aux_loss_matches_trl(train, moe_model_dir):
    """router_aux_loss_coef=None: the architecture's 0.05 times the policy's load-balancing loss (padding excluded by
    the attention mask) joins the loss, averaged over accumulated micro-batches by Trainer, and aux_loss is logged."""
    config = {"model_dir": moe_model_dir, "gradient_accumulation_steps": 2, "per_device_train_batch_size": 1}
    theirs, ours = train("trl", **config), train("posttrain", **config)
    _assert_same_logs(ours.logs, theirs.logs)
    assert "aux_loss" in ours.logs[0] and ours.trainer.router_aux_loss_coef == ARCHITECTURE_COEF


def test_moe_router_aux_loss_coef_zero_adds_no_aux_term(train, moe_model_dir):
    config = {"model_dir": moe_model_dir, "gradient_accumulation_steps": 2, "per_device_train_batch_size": 1}
    with_aux = train("posttrain", **config).logs
    without = train("posttrain", router_aux_loss_coef=0.0, max_steps=1, **config)
    assert not without.trainer.aux_loss_enabled and all("aux_loss" not in entry for entry in without.logs)
    # step 1 starts from the same weights: the losses differ by exactly the weighted aux term
    step1_aux = ARCHITECTURE_COEF * with_aux[0]["aux_loss"]
    assert math.isclose(with_aux[0]["loss"] - without.logs[0]["loss"], step1_aux, rel_tol=1e-3)


def test_router_aux_loss_coef_on_a_dense_model_is_an_error(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="router_aux_loss_coef=0.01, but Qwen2ForCausalLM is not a Mixture-of-Experts"):
        _trainer(tiny_model_dir, tmp_path, DATASETS["standard"](), router_aux_loss_coef=0.01)


def test_precomputed_reference_keeps_no_reference_model(train):
    trainer = train("posttrain", precompute_ref_log_probs=True).trainer
    assert trainer.ref_model is None
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(trainer.train_dataset.column_names)


def test_padding_free_batch_gives_the_padded_loss_and_gradients(tiny_model_dir, tmp_path):
    """One batch through compute_loss, packed into a single row vs padded: the same loss, metrics and gradients."""
    results = []
    for padding_free in (False, True):
        args = DPOConfig(output_dir=str(tmp_path), **{**BASE_CONFIG, "padding_free": padding_free})
        trainer = DPOTrainer(tiny_model_dir, args=args, train_dataset=DATASETS["standard"]())
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


def test_config_fields_and_defaults_match_trl():
    theirs = trl.DPOConfig(output_dir="unused", bf16=False)
    ours = DPOConfig(output_dir="unused", bf16=False)
    for field in dataclasses.fields(theirs):
        assert getattr(ours, field.name) == getattr(theirs, field.name), field.name
    assert DPOConfig.__dataclass_fields__["bf16"].default is None and ours.use_fused_kernels is True
    assert (ours.learning_rate, ours.logging_steps, ours.gradient_checkpointing) == (1e-6, 10, True)


@pytest.mark.parametrize(
    "config, error, match",
    [
        ({"loss_type": "sigmod"}, ValueError, r"loss_type \['sigmod'\].* sigmoid, hinge"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, ValueError, "loss_weights .* 1 weights .* 2 loss"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, ValueError, r"label_smoothing must lie in \[0.0, 0.5\)"),
        ({"loss_type": "aot", "label_smoothing": -0.1}, ValueError, "label_smoothing .* 'aot', got -0.1"),
        ({"loss_type": "exo_pair"}, ValueError, r"label_smoothing must lie in \(0.0, 0.5\) for loss_type 'exo_pair'"),
        ({"f_divergence_type": "kl"}, ValueError, "f_divergence_type 'kl' is not one of"),
        ({"f_divergence_type": "js_divergence", "loss_type": "bco_pair"}, ValueError, "includes bco_pair"),
        ({"beta": 0.0}, ValueError, "beta must be a finite number > 0, got 0.0"),
        ({"ld_alpha": 1.5}, ValueError, r"ld_alpha must lie in \[0, 1\]"),
        ({"use_weighting": True, "loss_type": "aot_unpaired"}, NotImplementedError, "aot and aot_unpaired sort"),
        ({"sync_ref_model": True, "precompute_ref_log_probs": True}, ValueError, "stale reference"),
        ({"truncation_mode": "middle"}, ValueError, "truncation_mode 'middle' is not one of"),
        ({"max_length": 0}, ValueError, "max_length must be a positive integer"),
    ],
    ids=lambda value: None if isinstance(value, dict) else "",
)
def test_config_rejects_bad_values(config, error, match):
    with pytest.raises(error, match=match):
        DPOConfig(output_dir="unused", bf16=False, **config)


def _trainer(model_dir, tmp_path, dataset, **config):
    args = DPOConfig(output_dir=str(tmp_path), **{**BASE_CONFIG, **config})
    return DPOTrainer(model_dir, args=args, train_dataset=dataset)


def test_missing_column_is_named(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="no 'chosen' column"):
        _trainer(tiny_model_dir, tmp_path, Dataset.from_dict({"prompt": ["a"], "rejected": ["b"]}))


def test_empty_completion_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="row 0: the 'chosen' completion is empty"):
        _trainer(tiny_model_dir, tmp_path, Dataset.from_dict({"prompt": ["a"], "chosen": [""], "rejected": ["b"]}))


def test_prompt_longer_than_max_length(tiny_model_dir, tmp_path):
    data = {"prompt": ["a" * 20, "b"], "chosen": ["x", "y"], "rejected": ["z", "w"]}
    with pytest.warns(UserWarning, match="dropped 1 of 2 rows"):
        trainer = _trainer(tiny_model_dir, tmp_path, Dataset.from_dict(data), max_length=8)
    assert len(trainer.train_dataset) == 1
    with pytest.raises(ValueError, match="every row of the train dataset .* max_length=8"):
        _trainer(tiny_model_dir, tmp_path, Dataset.from_dict({k: v[:1] for k, v in data.items()}), max_length=8)


def test_same_object_as_reference_is_refused(tmp_path):
    model, tokenizer = tiny_causal_lm(seed=0)
    args = DPOConfig(output_dir=str(tmp_path), **BASE_CONFIG)
    with pytest.raises(ValueError, match="same object"):
        DPOTrainer(model, ref_model=model, args=args, train_dataset=DATASETS["standard"](), processing_class=tokenizer)


def test_peft_config_without_peft_is_a_clear_error(tiny_model_dir, tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a))
    args = DPOConfig(output_dir=str(tmp_path), **BASE_CONFIG)
    with pytest.raises(ImportError, match="needs peft, which is not installed"):
        DPOTrainer(tiny_model_dir, args=args, train_dataset=DATASETS["standard"](), peft_config=object())


def test_vision_data_is_refused(tiny_model_dir, tmp_path):
    data = Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"], "images": [[]]})
    with pytest.raises(NotImplementedError, match="vision preference data"):
        _trainer(tiny_model_dir, tmp_path, data)


@pytest.mark.parametrize("loss_type", [["sigmoid", "sft"], ["sft"]], ids=["sigmoid+sft", "sft"])
def test_sft_term_is_invariant_to_gradient_accumulation(tiny_model_dir, tmp_path, loss_type):
    """The "sft" term is a token mean: under accumulation it averages over the chosen tokens of the whole accumulated
    batch, so 4 pairs in one micro-batch and 4 micro-batches of 1 pair take the same step (TRL's does not)."""
    params = []
    for batch, accumulation in ((4, 1), (1, 4)):
        # SGD: Adam's first step is lr * sign(gradient) wherever |gradient| >> eps, and flips on rounding elsewhere
        config = {**BASE_CONFIG, "max_steps": 1, "per_device_train_batch_size": batch, "optim": "sgd"}
        args = DPOConfig(output_dir=str(tmp_path / str(batch)), gradient_accumulation_steps=accumulation,
                         loss_type=loss_type, **config)  # fmt: skip
        trainer = DPOTrainer(tiny_model_dir, args=args, train_dataset=DATASETS["standard"]())
        trainer.train()
        params.append(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
    initial = torch.cat([p.flatten() for p in tiny_causal_lm(seed=0)[0].parameters()])
    assert not torch.equal(params[0], initial)
    torch.testing.assert_close(params[1], params[0], rtol=0, atol=1e-6)
