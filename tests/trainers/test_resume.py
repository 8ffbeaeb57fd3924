"""Resuming from a checkpoint continues exactly where a straight run is (TRL 1.16 is not exact in the GRPO and TR-DPO
cases): the final parameters are bit-identical to a run that never stopped (CPU, fp32)."""

import warnings

import pytest
import torch
from datasets import Dataset

import posttrain

COMMON = dict(
    logging_steps=1, per_device_train_batch_size=2, learning_rate=1e-2, seed=0, bf16=False,
    gradient_checkpointing=False, report_to="none", save_strategy="steps", save_steps=1, disable_tqdm=True,
)  # fmt: skip


def _reward(completions, **kwargs):
    # varies between the two completions of a prompt (almost surely), so every step has nonzero advantages
    return [float(sum(map(ord, c)) % 17) for c in completions]


CASES = {
    # name: (trainer, dataset, config, steps, resume from step)
    "sft-within-epoch": ("SFT", lambda: Dataset.from_dict({"text": [f"{a} plus {a} is {2 * a}." for a in range(8)]}),
                         {}, 3, 2),
    "sft-next-epoch": ("SFT", lambda: Dataset.from_dict({"text": [f"{a} times 2 is {2 * a}." for a in range(4)]}),
                       {}, 4, 3),
    "dpo-within-epoch": ("DPO", lambda: Dataset.from_dict(
        {"prompt": ["2+2=", "x", "Hi", "The sky is"], "chosen": ["4", "y z", " there", " blue"],
         "rejected": ["5", "q", " you!", " green"]}), {}, 2, 1),
    "dpo-next-epoch": ("DPO", lambda: Dataset.from_dict(
        {"prompt": ["2+2=", "x", "Hi", "The sky is"], "chosen": ["4", "y z", " there", " blue"],
         "rejected": ["5", "q", " you!", " green"]}), {}, 4, 3),
    "dpo-sync-ref-model": ("DPO", lambda: Dataset.from_dict(
        {"prompt": ["2+2=", "x", "Hi", "The sky is"], "chosen": ["4", "y z", " there", " blue"],
         "rejected": ["5", "q", " you!", " green"]}),
        {"sync_ref_model": True, "ref_model_sync_steps": 1, "ref_model_mixup_alpha": 0.5}, 4, 2),
    "grpo-within-epoch": ("GRPO", lambda: Dataset.from_dict({"prompt": ["hello", "abc", "xyz!", "qq"]}), {}, 3, 2),
    "grpo-next-epoch": ("GRPO", lambda: Dataset.from_dict({"prompt": ["hello", "abc", "xyz!"]}), {}, 5, 4),
    "grpo-num-iterations-odd-step": ("GRPO", lambda: Dataset.from_dict({"prompt": ["hello", "abc", "xyz!", "qq"]}),
                                     {"num_iterations": 2, "beta": 0.05}, 4, 3),
    "rloo-next-epoch": ("RLOO", lambda: Dataset.from_dict({"prompt": ["hello", "abc", "xyz!"]}), {}, 5, 4),
    "distillation-next-epoch": ("Distillation", lambda: Dataset.from_dict({"prompt": ["hello", "abc", "xyz!"]}),
                                {"beta": 0.5}, 4, 3),
}  # fmt: skip
GRPO_CONFIG = dict(num_generations=2, max_completion_length=4, temperature=1.0)


def _trainer(kind, model_dir, dataset, output_dir, steps, config):
    module = posttrain
    extra = dict(GRPO_CONFIG) if kind in ("GRPO", "RLOO") else {}
    if kind == "Distillation":  # the model its own (frozen) teacher
        extra = {"max_completion_length": 4, "temperature": 1.0}
    args = getattr(module, f"{kind}Config")(output_dir=str(output_dir), max_steps=steps, **COMMON, **extra, **config)
    kwargs = {"reward_funcs": _reward} if kind in ("GRPO", "RLOO") else {}
    if kind == "Distillation":
        kwargs = {"teacher_model": model_dir}
    return getattr(module, f"{kind}Trainer")(model_dir, args=args, train_dataset=dataset(), **kwargs)


def _params(trainer):
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_run_ends_where_a_straight_run_does(case, tiny_model_dir, tmp_path):
    kind, dataset, config, steps, resume_at = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        straight = _trainer(kind, tiny_model_dir, dataset, tmp_path / "straight", steps, config)
        straight.train()
        resumed = _trainer(kind, tiny_model_dir, dataset, tmp_path / "resumed", steps, config)
        resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / f"checkpoint-{resume_at}"))
    expected, actual = _params(straight), _params(resumed)
    initial = _params(_trainer(kind, tiny_model_dir, dataset, tmp_path / "initial", steps, config))
    assert any(not torch.equal(expected[name], initial[name]) for name in expected)
    for name in expected:
        assert torch.equal(actual[name], expected[name]), f"{name}: max diff {(actual[name] - expected[name]).abs().max()}"
    logged = [entry for entry in resumed.state.log_history if "loss" in entry]
    straight_logged = [entry for entry in straight.state.log_history if "loss" in entry]
    assert logged[-1]["loss"] == straight_logged[-1]["loss"]
    if kind in ("SFT", "DPO"):  # num_tokens continues from the checkpoint instead of restarting at 0
        assert logged[-1]["num_tokens"] == straight_logged[-1]["num_tokens"]
