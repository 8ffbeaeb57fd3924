"""Test doubles for vLLM: a fake `vllm` package (the part of vLLM 0.30's Python API that TRL 1.16 and posttrain
call), a deterministic CPU engine behind it (fake_engine), and an in-test vLLM server speaking TRL's protocol
(server); plus the tiny policy, rewards and GRPO run the generation tests share. Importable from the tests as
`fake_vllm`; the fake `vllm` itself only inside `installed`, which puts this folder on sys.path."""

import contextlib
import os
import sys
import warnings
from pathlib import Path

FAKE_VLLM_DIR = Path(__file__).resolve().parent
EOS_IDS = [258, *range(60, 90)]  # <|im_end|>, and bytes that also end a completion so that lengths vary
PROMPTS = ["hello", "abc", "xyz!", "qq", "ab", "b"]
GRPO_BASE = {
    "per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 8, "max_steps": 2,
    "logging_steps": 1, "bf16": False, "report_to": "none", "learning_rate": 1e-2, "seed": 1,
    "gradient_checkpointing": False, "disable_tqdm": True,
}  # fmt: skip


def letters_reward(completions, **kwargs):
    return [sum(ch in "abcdefghijklmnopqrstuvwxyz" for ch in c) / 8 for c in completions]


def length_reward(completion_ids, **kwargs):
    return [len(ids) / 8 for ids in completion_ids]


def save_tiny_policy(path) -> str:
    """The tiny random Qwen2 policy and its byte-level tokenizer, saved to `path` (EOS_IDS end completions)."""
    from posttrain.models import tiny_causal_lm

    model, tokenizer = tiny_causal_lm(seed=0)
    model.generation_config.eos_token_id = EOS_IDS
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def train_grpo(module, model_dir: str, output_dir, *, peft_config=None, callbacks=None, **overrides):
    """(trainer, logged steps) of `module`'s (trl or posttrain) GRPOTrainer trained on PROMPTS with both rewards."""
    from datasets import Dataset

    environ = dict(os.environ)  # the vLLM set-up exports RANK, MASTER_PORT...: the next trainer must not see them
    args = module.GRPOConfig(output_dir=str(output_dir), **{**GRPO_BASE, **overrides})
    trainer = module.GRPOTrainer(
        model=model_dir, reward_funcs=[letters_reward, length_reward], args=args, peft_config=peft_config,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}), callbacks=callbacks,
    )  # fmt: skip
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
    finally:
        os.environ.clear()
        os.environ.update(environ)
    return trainer, [entry for entry in trainer.state.log_history if "train_runtime" not in entry]


@contextlib.contextmanager
def installed(monkeypatch):
    """`import vllm` gives the fake inside the block (for posttrain and TRL alike); afterwards vllm is uninstalled
    again and the environment variables the trainers set for vLLM (RANK, MASTER_PORT, ...) are restored."""
    environ = dict(os.environ)
    monkeypatch.syspath_prepend(str(FAKE_VLLM_DIR))
    _forget_vllm()
    # TRL binds these names at its first import, and only when vllm was importable then
    import trl.generation.vllm_generation as trl_vllm
    import vllm
    import vllm.sampling_params

    for name in ("LLM", "SamplingParams", "RequestOutput"):
        monkeypatch.setattr(trl_vllm, name, getattr(vllm, name), raising=False)
    monkeypatch.setattr(trl_vllm, "StructuredOutputsParams", vllm.sampling_params.StructuredOutputsParams,
                        raising=False)  # fmt: skip
    try:
        yield vllm
    finally:
        _forget_vllm()
        os.environ.clear()
        os.environ.update(environ)


def _forget_vllm():
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        del sys.modules[name]
