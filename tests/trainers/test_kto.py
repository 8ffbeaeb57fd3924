"""KTOTrainer: parity with TRL 1.16's KTOTrainer (the same logged values at each of the first 3 steps) for both loss
types, unbalanced weights, paired and unpaired, standard and conversational data, the precomputed, synced and PEFT
references, the fused and plain paths; bad input.

Every run: the tiny Qwen2 of tests/conftest.py, fp32 on the CPU, batches of 2, 3 steps. Runs are cached per
configuration, so a TRL run (or a posttrain run) is shared by every test that needs it.
"""

import dataclasses

import pytest
import torch
import trl
from datasets import Dataset
from moe_utils import ARCHITECTURE_COEF, save_tiny_moe
from testing_utils import assert_same_logs, logged_close

import posttrain
from posttrain import KTOConfig, KTOTrainer
from posttrain.losses.kto import kl_estimate, kto_losses
from posttrain.models import tiny_causal_lm
from posttrain.trainers.kto import _completion_logps, _labels

# The unpaired rows are 4 desirable and 2 undesirable, on purpose (see test_the_kl_estimate_and_both_sides_are_exercised)
pytestmark = pytest.mark.filterwarnings("ignore:the train dataset has .* desirable")

# Step 1 runs the same weights on the same batch: only the order of fp32 sums differs (the fused kernel vs TRL's
# chunked head), and rewards and kl are exactly 0 (policy == reference). Later steps start from weights Adam moved by
# lr * m / sqrt(v), where 1e-7 gradient differences become ~1e-5 relative weight differences; kl and rewards are
# small differences of log-probs of size ~30. Worst seen (default cases): 2.3e-7 relative at step 1, 2.1e-5 relative
# (kl = 0.09) at steps 2-3. A real mismatch (a wrong mask, pairing, weight or sign) moves these values by > 1e-2.
STEP1_RTOL, STEP1_ATOL = 1e-4, 1e-6
LATER_RTOL, LATER_ATOL = 1e-3, 1e-4

EXAMPLES = [("2+2=", "4", True), ("The sky is", " blue", False), ("Hi", " there", True), ("x", "y z", False),
            ("a", "b", True), ("bcd", "e f g", True)]  # fmt: skip
PAIRS = [("2+2=", "4", "5"), ("The sky is", " blue", " green"), ("Hi", " there", " you!"), ("x", "y z", "q")]


def _user(text):
    return [{"role": "user", "content": text}]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


def _unpaired(make_prompt, make_completion):
    return {
        "prompt": [make_prompt(p) for p, _, _ in EXAMPLES],
        "completion": [make_completion(c) for _, c, _ in EXAMPLES],
        "label": [label for _, _, label in EXAMPLES],
    }


def _paired(implicit=False):
    if implicit:
        return {"chosen": [p + c for p, c, _ in PAIRS], "rejected": [p + r for p, _, r in PAIRS]}
    return {
        "prompt": [p for p, _, _ in PAIRS],
        "chosen": [c for _, c, _ in PAIRS],
        "rejected": [r for _, _, r in PAIRS],
    }


# The unpaired rows' labels give a third batch without an undesirable example (its rejected metrics are not logged)
DATASETS = {
    "unpaired": lambda: Dataset.from_dict(_unpaired(str, str)),
    "conversational": lambda: Dataset.from_dict(_unpaired(_user, lambda c: _assistant(c.strip()))),
    "paired": lambda: Dataset.from_dict(_paired()),
    "implicit": lambda: Dataset.from_dict(_paired(implicit=True)),
}

BASE_CONFIG = {
    "max_steps": 3,
    "logging_steps": 1,
    "per_device_train_batch_size": 2,
    "per_device_eval_batch_size": 2,
    "learning_rate": 1e-2,
    "seed": 0,
    "bf16": False,
    "gradient_checkpointing": False,
    "report_to": "none",
    "save_strategy": "no",
    "disable_tqdm": True,
}


@dataclasses.dataclass
class Run:
    logs: list[dict]
    eval_metrics: dict | None
    trainer: object


@pytest.fixture(scope="module")
def train(tiny_model_dir, tmp_path_factory):
    """train(lib, data="unpaired", evaluate=False, model=None, model_dir=None, peft=False, **config) -> Run, cached
    per arguments. model: an in-memory (model, tokenizer); model_dir: a saved model other than the tiny Qwen2; peft:
    train a LoRA adapter."""
    cache = {}

    def run(lib: str, data="unpaired", evaluate=False, model=None, model_dir=None, peft=False, **config) -> Run:
        key = (lib, data, evaluate, model is not None, model_dir, peft, repr(sorted(config.items())))
        if key not in cache:
            module = trl if lib == "trl" else posttrain
            args = module.KTOConfig(output_dir=str(tmp_path_factory.mktemp("kto")), **{**BASE_CONFIG, **config})
            extra = {"processing_class": model[1]} if model is not None else {}
            if peft:
                from peft import LoraConfig

                extra["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM")  # fmt: skip
            trainer = module.KTOTrainer(
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


def _case(case_id, data="unpaired", fused=True, slow=False, **config):
    marks = [pytest.mark.slow] if slow else []
    return pytest.param(data, fused, config, id=case_id, marks=marks)


UNBALANCED = {"desirable_weight": 2.0, "undesirable_weight": 0.5}
PARITY_CASES = [
    _case("kto-unpaired"),
    _case("kto-unpaired-plain", fused=False),
    _case("apo-zero-unpaired", loss_type="apo_zero_unpaired"),
    _case("unbalanced-weights-plain", fused=False, **UNBALANCED),
    _case("paired-explicit-prompt-plain", data="paired", fused=False),
    _case("conversational", data="conversational"),
    _case("precompute-ref-plain", fused=False, precompute_ref_log_probs=True),
    _case(
        "apo-precompute-ref-plain", fused=False, slow=True, loss_type="apo_zero_unpaired", precompute_ref_log_probs=True
    ),
    _case(
        "tr-dpo-sync-every-step-plain",
        fused=False,
        sync_ref_model=True,
        ref_model_sync_steps=1,
        ref_model_mixup_alpha=0.5,
    ),
    _case("truncation-plain", fused=False, max_length=8),
    _case("batch-3-plain", fused=False, slow=True, per_device_train_batch_size=3),
    _case("gradient-accumulation-plain", fused=False, slow=True, gradient_accumulation_steps=2),
    _case("paired-implicit-prompt", data="implicit", slow=True),
    _case("unbalanced-weights", slow=True, **UNBALANCED),
    _case("precompute-ref", slow=True, precompute_ref_log_probs=True),
    _case("precompute-ref-batch-4", slow=True, precompute_ref_log_probs=True, precompute_ref_batch_size=4),
    _case("apo-unbalanced-weights", slow=True, loss_type="apo_zero_unpaired", **UNBALANCED),
    _case("gradient-checkpointing", slow=True, gradient_checkpointing=True),
    _case("tr-dpo-sync-every-step", slow=True, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5),
]


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("data, fused, config", PARITY_CASES)
def test_logged_values_match_trl(train, data, fused, config):
    theirs = train("trl", data, **config)
    ours = train("posttrain", data, **config, **({} if fused else {"use_fused_kernels": False}))
    _assert_same_logs(ours.logs, theirs.logs)


def test_the_kl_estimate_and_both_sides_are_exercised(train):
    """The parity runs are only as strong as what they log: kl > 0 at some step, a step with both kinds of examples
    and one without an undesirable example (its rejected metrics absent)."""
    logs = train("trl").logs
    assert any(entry["kl"] > 0 for entry in logs)
    assert "rewards/margins" in logs[1] and "logps/rejected" not in logs[2] and "logps/chosen" in logs[2]


def test_evaluation_matches_trl(train):
    theirs = train("trl", evaluate=True).eval_metrics
    ours = train("posttrain", evaluate=True, use_fused_kernels=False).eval_metrics
    timing = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}
    assert ours.keys() == theirs.keys()
    bad = {key: (ours[key], theirs[key]) for key in theirs.keys() - timing if not _close(ours[key], theirs[key], 3)}
    assert not bad
    assert "eval_kl" in ours and "eval_rewards/margins" in ours


def test_fused_and_plain_paths_give_the_same_numbers(train):
    fused, plain = train("posttrain").logs, train("posttrain", use_fused_kernels=False).logs
    for step, (a, b) in enumerate(zip(fused, plain), start=1):
        bad = {key: (a[key], b[key]) for key in a if not _close(a[key], b[key], step)}
        assert not bad, f"step {step}: {bad}"


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_lora_adapter_with_disabled_adapter_reference_matches_trl(train):
    pytest.importorskip("peft")
    theirs = train("trl", peft=True)
    ours = train("posttrain", peft=True, use_fused_kernels=False)
    _assert_same_logs(ours.logs, theirs.logs)
    assert ours.trainer.ref_model is None  # the reference is the model with its adapter disabled
    assert ours.logs[-1]["rewards/chosen"] != 0.0


@pytest.mark.slow
def test_moe_aux_loss_matches_trl(train, tmp_path_factory):
    """router_aux_loss_coef=None: the architecture's coefficient times the policy's load-balancing loss joins the
    loss, and aux_loss is logged."""
    model_dir = save_tiny_moe(tmp_path_factory.mktemp("tiny-moe"))
    theirs, ours = train("trl", model_dir=model_dir), train("posttrain", model_dir=model_dir)
    _assert_same_logs(ours.logs, theirs.logs)
    assert "aux_loss" in ours.logs[0] and ours.trainer.router_aux_loss_coef == ARCHITECTURE_COEF


def test_saved_outputs_are_trls(train, tmp_path):
    """save_model writes the files TRL's writes, and the saved weights are the trained ones."""
    saved = {}
    for lib in ("trl", "posttrain"):
        trainer = train(lib).trainer
        trainer.save_model(str(tmp_path / lib))
        saved[lib] = {path.name for path in (tmp_path / lib).iterdir()}
    assert saved["posttrain"] == saved["trl"]
    trainer = train("posttrain").trainer
    reloaded = type(trainer.model).from_pretrained(str(tmp_path / "posttrain"))
    for (name, param), loaded in zip(trainer.model.named_parameters(), reloaded.parameters(), strict=True):
        assert torch.equal(param, loaded), name


def test_parameters_change_and_reference_stays(train, tiny_model_dir):
    trainer = train("posttrain").trainer
    initial = dict(type(trainer.model).from_pretrained(tiny_model_dir).named_parameters())
    unchanged = [name for name, param in trainer.model.named_parameters() if torch.equal(param, initial[name])]
    assert not unchanged, f"parameters not updated by train(): {unchanged}"
    for name, param in trainer.ref_model.named_parameters():
        assert torch.equal(param, initial[name]), f"reference parameter {name} changed"


def test_precomputed_reference_keeps_no_reference_model(train):
    trainer = train("posttrain", precompute_ref_log_probs=True, use_fused_kernels=False).trainer
    assert trainer.ref_model is None
    assert {"ref_logps", "ref_KL_logps"} <= set(trainer.train_dataset.column_names)
    apo = train("posttrain", loss_type="apo_zero_unpaired", precompute_ref_log_probs=True, use_fused_kernels=False)
    assert "ref_logps" in apo.trainer.train_dataset.column_names
    assert not {"ref_KL_logps", "KL_completion_ids"} & set(apo.trainer.train_dataset.column_names)


def test_in_memory_model_trains_against_a_copy_of_itself(train):
    """An in-memory model (no path to reload a reference from) is deep-copied into the reference: the same numbers
    as loading both from disk."""
    model, tokenizer = tiny_causal_lm(seed=0)
    run = train("posttrain", model=(model, tokenizer), use_fused_kernels=False)
    assert run.trainer.ref_model is not run.trainer.model
    assert not any(p.requires_grad for p in run.trainer.ref_model.parameters())
    _assert_same_logs(run.logs, train("trl").logs)


def test_activation_offloading_gives_the_same_numbers(train):
    offloaded = train("posttrain", activation_offloading=True, use_fused_kernels=False).logs
    _assert_same_logs(offloaded, train("posttrain", use_fused_kernels=False).logs)


def test_a_trl_config_is_accepted(tiny_model_dir, tmp_path):
    args = trl.KTOConfig(output_dir=str(tmp_path), desirable_weight=1.5, **BASE_CONFIG)
    trainer = KTOTrainer(tiny_model_dir, args=args, train_dataset=DATASETS["unpaired"]())
    assert isinstance(trainer.args, KTOConfig) and trainer.args.desirable_weight == 1.5


def test_config_fields_and_defaults_match_trl():
    theirs = trl.KTOConfig(output_dir="unused", bf16=False)
    ours = KTOConfig(output_dir="unused", bf16=False)
    for field in dataclasses.fields(theirs):
        assert getattr(ours, field.name) == getattr(theirs, field.name), field.name
    assert KTOConfig.__dataclass_fields__["bf16"].default is None and ours.use_fused_kernels is True
    assert (ours.learning_rate, ours.train_sampling_strategy, ours.gradient_checkpointing) == (1e-6, "sequential", True)


@pytest.mark.parametrize(
    "config, match",
    [
        ({"loss_type": "sigmoid"}, "loss_type 'sigmoid' is not one of: kto, apo_zero_unpaired"),
        ({"beta": 0.0}, "beta must be a finite number > 0, got 0.0"),
        ({"desirable_weight": -1.0}, "desirable_weight must be a finite number >= 0, got -1.0"),
        ({"undesirable_weight": float("nan")}, "undesirable_weight must be a finite number >= 0, got nan"),
        ({"train_sampling_strategy": "random"}, "train_sampling_strategy 'random' breaks loss_type 'kto'"),
        ({"per_device_train_batch_size": 1}, "per_device_train_batch_size=1 with loss_type 'kto'"),
        ({"sync_ref_model": True, "precompute_ref_log_probs": True}, "stale reference"),
        ({"max_length": 0}, "max_length must be a positive integer"),
        ({"precompute_ref_batch_size": 0}, "precompute_ref_batch_size must be a positive integer, got 0"),
    ],
    ids=lambda value: None if isinstance(value, dict) else "",
)
def test_config_rejects_bad_values(config, match):
    with pytest.raises(ValueError, match=match):
        KTOConfig(output_dir="unused", bf16=False, **config)


def test_apo_zero_unpaired_takes_any_sampling_and_batch_size():
    args = KTOConfig(output_dir="unused", bf16=False, loss_type="apo_zero_unpaired", train_sampling_strategy="random",
                     per_device_train_batch_size=1)  # fmt: skip
    assert not args.estimates_kl


def _trainer(model_dir, tmp_path, dataset, **config):
    args = KTOConfig(output_dir=str(tmp_path), **{**BASE_CONFIG, **config})
    return KTOTrainer(model_dir, args=args, train_dataset=dataset)


@pytest.mark.parametrize(
    "data, error, match",
    [
        ({"prompt": ["a"], "completion": ["b"]}, ValueError, "train dataset has no 'label' column"),
        ({"prompt": ["a"], "chosen": ["b"]}, ValueError, "has a 'chosen' column but no 'rejected' column"),
        ({"messages": [[{"role": "user", "content": "a"}]]}, ValueError, "no 'prompt' or 'completion' or 'label'"),
        ({"prompt": ["a", "b"], "completion": ["c", "d"], "label": ["good", "bad"]}, ValueError,
         r"train dataset row 0: 'label' must be a bool .* got 'good' \(str\)"),
        ({"prompt": ["a", "b"], "completion": ["c", "d"], "label": [0.0, 1.0]}, ValueError, r"got 0.0 \(float\)"),
        ({"prompt": ["a"], "completion": ["b"], "label": [True], "image": [None]}, NotImplementedError,
         "vision preference data"),
    ],
    ids=["no-label", "chosen-only", "sft-data", "string-labels", "float-labels", "vision"],
)  # fmt: skip
def test_bad_input_is_a_clear_error(tiny_model_dir, tmp_path, data, error, match):
    with pytest.raises(error, match=match):
        _trainer(tiny_model_dir, tmp_path, Dataset.from_dict(data))


def test_bad_eval_labels_name_the_eval_dataset(tiny_model_dir, tmp_path):
    args = KTOConfig(output_dir=str(tmp_path), **BASE_CONFIG)
    bad = Dataset.from_dict({"prompt": ["a"], "completion": ["b"], "label": ["yes"]})
    with pytest.raises(ValueError, match="eval dataset row 0: 'label' must be a bool"):
        KTOTrainer(tiny_model_dir, args=args, train_dataset=DATASETS["unpaired"](), eval_dataset=bad)


def test_same_object_as_reference_is_refused(tmp_path):
    model, tokenizer = tiny_causal_lm(seed=0)
    args = KTOConfig(output_dir=str(tmp_path), **BASE_CONFIG)
    with pytest.raises(ValueError, match="same object"):
        KTOTrainer(model, ref_model=model, args=args, train_dataset=DATASETS["unpaired"](), processing_class=tokenizer)


def test_sync_ref_model_with_peft_is_not_implemented(tiny_model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    args = KTOConfig(output_dir=str(tmp_path), sync_ref_model=True, **BASE_CONFIG)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    with pytest.raises(NotImplementedError, match="sync_ref_model=True with a PEFT model"):
        KTOTrainer(tiny_model_dir, args=args, train_dataset=DATASETS["unpaired"](), peft_config=lora)


def test_unbalanced_data_warns(tiny_model_dir, tmp_path):
    data = Dataset.from_dict({"prompt": ["a", "b", "c", "d"], "completion": ["w", "x", "y", "z"],
                              "label": [True, False, False, False]})  # fmt: skip
    with pytest.warns(UserWarning, match="1 desirable and 3 undesirable examples, and neither weight balances"):
        _trainer(tiny_model_dir, tmp_path, data)


def test_loss_in_the_head_equals_autograd_through_the_per_token_log_probs(tiny_model_dir, tmp_path):
    """compute_loss hands the loss to the fused head (its gradients come from the forward); the same batch through
    the per-token log-probs and kto_losses with plain autograd gives the same loss and gradients. One example has no
    completion token left: no head chunk holds it, and its constant loss still counts, as in TRL."""
    trainer = _trainer(tiny_model_dir, tmp_path, DATASETS["unpaired"](), desirable_weight=1.5, beta=0.5)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    batch["completion_mask"][1] = 0
    with torch.no_grad():  # a sharper reference: lower log-probs of most tokens, a positive KL estimate
        trainer.ref_model.get_output_embeddings().weight.mul_(3.0)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {name: param.grad.clone() for name, param in trainer.model.named_parameters()}
    trainer.model.zero_grad()

    ref_logps, ref_kl_logps = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    with torch.no_grad():
        kl_logps = _completion_logps(trainer.model, batch, "KL_")
    kl = kl_estimate(kl_logps, ref_kl_logps)
    assert kl > 0  # the reference point is exercised
    out = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        logprob_labels=_labels(batch))  # fmt: skip
    expected = kto_losses(
        out.logprobs.sum(1), ref_logps, batch["label"], kl, beta=0.5, desirable_weight=1.5, undesirable_weight=1.0
    ).mean()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    for name, param in trainer.model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-7, msg=name)
