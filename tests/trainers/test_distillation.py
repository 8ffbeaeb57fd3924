"""DistillationTrainer: step-by-step parity with TRL 1.16's DistillationTrainer, its config, learning and bad inputs.

Parity: both trainers get the same tiny student and teacher directories, dataset and config; with the same seed they
draw the same prompts, sample the same completions and log the same values (see test_grpo.py).
"""

import dataclasses
import math

import pytest
import torch
import trl
from datasets import Dataset
from trainers.online_runs import Runs
from trainers.test_grpo import STOP_IDS, assert_logs_close
from transformers import AutoModelForCausalLM

import posttrain
from posttrain.models import tiny_causal_lm

PROMPTS = ["hello", "abc", "xyz!", "qq", "ab", "b", "hi there", "0123"]

BASE = {
    "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2, "max_completion_length": 8, "max_steps": 3,
    "logging_steps": 1, "bf16": False, "report_to": "none", "learning_rate": 1e-2, "seed": 1,
    "gradient_checkpointing": False, "disable_tqdm": True,
}  # fmt: skip


def standard_dataset():
    return Dataset.from_dict({"prompt": PROMPTS})


def conversational_dataset():
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS]})


def _save(path, seed, **config):
    model, tokenizer = tiny_causal_lm(seed=seed, **config)
    model.generation_config.eos_token_id = [258, *STOP_IDS]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return {
        "student": _save(tmp_path_factory.mktemp("student"), seed=0),
        "teacher": _save(tmp_path_factory.mktemp("teacher"), seed=3),
        # a wider teacher: another hidden size, the same vocabulary
        "wide_teacher": _save(tmp_path_factory.mktemp("wide-teacher"), seed=4, hidden_size=96, intermediate_size=192),
    }


# name: (dataset, trainer arguments (the teacher's name), config overrides, evaluate)
PARITY = {
    "reverse_kl_ga2": (standard_dataset, {"teacher_model": "teacher"}, {"gradient_accumulation_steps": 2}, False),
    "forward_kl_temperature_wide_teacher": (
        standard_dataset, {"teacher_model": "wide_teacher"}, {"beta": 0.0, "temperature": 0.7, "top_k": 50}, False,
    ),
    "jsd_conversational_eval": (
        conversational_dataset, {"teacher_model": "teacher"}, {"beta": 0.5, "temperature": 1.3}, True,
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_dirs):
    cases = {name: (data, {"teacher_model": model_dirs[kw["teacher_model"]]}, config, evaluate)
             for name, (data, kw, config, evaluate) in PARITY.items()}  # fmt: skip
    return Runs(tmp_path_factory, "Distillation", cases, BASE, model=model_dirs["student"])


@pytest.mark.parametrize("name", list(PARITY))
def test_logs_match_trl_step_by_step(runs, name):
    _, expected = runs.get(name, "trl")
    _, actual = runs.get(name, "posttrain")
    assert_logs_close(expected, actual)
    assert actual[0]["loss"] > 0 and actual[0]["grad_norm"] > 0  # the steps actually train


def test_fused_kernels_off_gives_the_same_numbers(runs):
    _, fused = runs.get("reverse_kl_ga2", "posttrain")
    _, plain = runs.get("reverse_kl_ga2", "posttrain", use_fused_kernels=False)
    assert_logs_close(fused, plain)


def test_parameters_change_and_the_teacher_stays(runs, model_dirs):
    trainer, _ = runs.get("reverse_kl_ga2", "posttrain")
    initial = AutoModelForCausalLM.from_pretrained(model_dirs["student"]).state_dict()
    trained = trainer.model.state_dict()
    assert all(not torch.equal(value, trained[name].cpu()) for name, value in initial.items())
    teacher = AutoModelForCausalLM.from_pretrained(model_dirs["teacher"]).state_dict()
    kept = trainer.accelerator.unwrap_model(trainer.teacher_model).state_dict()
    assert all(torch.equal(value, kept[name].cpu()) for name, value in teacher.items())
    assert not trainer.teacher_model.training


def _reverse_kl(student, teacher, input_ids) -> float:
    with torch.no_grad():
        log_s = student(input_ids=input_ids).logits.log_softmax(-1)
        log_t = teacher(input_ids=input_ids).logits.log_softmax(-1)
    return (log_s.exp() * (log_s - log_t)).sum(-1).mean().item()


def test_student_moves_towards_the_teacher(tmp_path):
    # A teacher whose LM head is a bias alone (with a bias, as some architectures have): lowercase letters are
    # e^4 times as likely as any other token, whatever the context. 12 steps of reverse KL: the divergence on fixed
    # sequences, measured with the models' own logits, falls by more than half
    teacher, _ = tiny_causal_lm(seed=3)
    teacher.lm_head = torch.nn.Linear(64, teacher.config.vocab_size, bias=True)
    with torch.no_grad():
        teacher.lm_head.weight.zero_()
        teacher.lm_head.bias.zero_()
        teacher.lm_head.bias[ord("a") : ord("z") + 1] = 4.0
    student, tokenizer = tiny_causal_lm(seed=0)
    probe = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(0))
    before = _reverse_kl(student, teacher, probe)
    args = posttrain.DistillationConfig(
        output_dir=str(tmp_path), **{**BASE, "max_steps": 12, "learning_rate": 3e-2, "use_fused_kernels": False}
    )
    trainer = posttrain.DistillationTrainer(
        student, teacher_model=teacher, args=args, processing_class=tokenizer, train_dataset=standard_dataset()
    )
    trainer.train()
    after = _reverse_kl(trainer.model, teacher, probe)
    assert after < 0.5 * before, (before, after)


def test_config_fields_and_defaults_match_trl():
    theirs = trl.DistillationConfig(output_dir="unused", bf16=False)
    ours = posttrain.DistillationConfig(output_dir="unused", bf16=False)
    for field in dataclasses.fields(theirs):
        assert getattr(ours, field.name) == getattr(theirs, field.name), field.name
    assert (ours.beta, ours.learning_rate, ours.temperature) == (1.0, 1e-6, 1.0) and ours.use_fused_kernels is True
    assert ours.steps_per_generation == ours.gradient_accumulation_steps and ours.num_generations == 1


# ---- bad input ----


def tiny_args(tmp_path, **overrides):
    kwargs = {**BASE, "max_steps": 1, "max_completion_length": 4, "use_fused_kernels": False, **overrides}
    return posttrain.DistillationConfig(output_dir=str(tmp_path), **kwargs)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [({"beta": 1.5}, r"beta must be a finite number in \[0, 1\]"), ({"temperature": 0.0}, "temperature must be")],
    ids=["beta", "temperature"],
)
def test_config_rejects_bad_values(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_args(tmp_path, **overrides)


def test_teacher_with_another_vocabulary_is_a_clear_error(model_dirs, tmp_path):
    teacher, _ = tiny_causal_lm(seed=1, vocab_size=300)
    with pytest.raises(ValueError, match="the student's vocab_size is 259 but the teacher's is 300"):
        posttrain.DistillationTrainer(
            model_dirs["student"], teacher_model=teacher, args=tiny_args(tmp_path), train_dataset=standard_dataset()
        )


def test_soft_capped_teacher_is_not_implemented(model_dirs, tmp_path):
    teacher, _ = tiny_causal_lm(seed=1)
    teacher.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="the teacher .* final_logit_softcapping=30.0"):
        posttrain.DistillationTrainer(
            model_dirs["student"], teacher_model=teacher, args=tiny_args(tmp_path), train_dataset=standard_dataset()
        )


@pytest.mark.parametrize(
    ("dataset", "kwargs", "error", "match"),
    [
        (lambda: Dataset.from_dict({"question": PROMPTS}), {}, ValueError, r"no 'prompt' column \(columns: question\)"),
        (standard_dataset, {"teacher_model": None}, ValueError, "DistillationTrainer needs a teacher"),
        (standard_dataset, {"tools": [len]}, NotImplementedError, "tools"),
        (lambda: Dataset.from_dict({"prompt": ["a"]}), {}, ValueError, "has 1 prompts, fewer than the 2"),
    ],
    ids=["missing_prompt", "no_teacher", "tools", "too_small"],
)  # fmt: skip
def test_bad_inputs_are_clear_errors(model_dirs, tmp_path, dataset, kwargs, error, match):
    kwargs = {"teacher_model": model_dirs["teacher"], **kwargs}
    with pytest.raises(error, match=match):
        posttrain.DistillationTrainer(
            model_dirs["student"], args=tiny_args(tmp_path), train_dataset=dataset(), **kwargs
        )


# ---- the divergence in the student's forward ----


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.5, 2.0)], ids=["unscaled", "rescaled"])
def test_head_divergence_matches_the_models_own_logits(fused, scales):
    """HeadDivergence inside the patched forward gives the divergence of the two models' full logits (each
    multiplied by its logit scale, as Cohere / Granite forwards do) at the label positions, and its gradient."""
    from posttrain.models.lm_head import HeadDivergence, add_fused_logprob_head

    student, _ = tiny_causal_lm(seed=0)
    teacher, _ = tiny_causal_lm(seed=2, hidden_size=96, intermediate_size=192)
    reference = tiny_causal_lm(seed=0)[0]
    add_fused_logprob_head(student, use_fused_kernels=fused)
    ids = torch.randint(0, 256, (3, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[0, -2:] = -100
    beta, temperature = 0.3, 0.8
    with torch.no_grad():
        teacher_out = teacher(input_ids=ids, output_hidden_states=True)
    divergence = HeadDivergence(
        teacher_out.hidden_states[-1][:, :-1], teacher.lm_head, beta=beta, temperature=temperature,
        student_scale=scales[0], teacher_scale=scales[1],
    )  # fmt: skip
    out = student(input_ids=ids, logprob_labels=labels, head_divergence=divergence)
    out.loss.backward()

    # the same divergence from the two models' full logits, in float64
    mask = labels[:, 1:] != -100
    log_s = (reference(input_ids=ids).logits[:, :-1].double() * scales[0] / temperature).log_softmax(-1)[mask]
    log_t = (teacher_out.logits[:, :-1].double() * scales[1] / temperature).log_softmax(-1)[mask]
    log_m = torch.logsumexp(torch.stack([log_s + math.log(1 - beta), log_t + math.log(beta)]), dim=0)
    jsd = beta * (log_t.exp() * (log_t - log_m)).sum(-1) + (1 - beta) * (log_s.exp() * (log_s - log_m)).sum(-1)
    entropy = -(log_s.exp() * log_s).sum(-1)
    torch.testing.assert_close(out.loss.double(), jsd.sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.entropy[mask].double(), entropy, rtol=1e-5, atol=1e-5)
    jsd.sum().backward()
    torch.testing.assert_close(student.lm_head.weight.grad, reference.lm_head.weight.grad.float(), rtol=1e-4, atol=1e-6)
    assert teacher.lm_head.weight.grad is None
