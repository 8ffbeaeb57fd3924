"""`posttrain quickstart` and the built-in addition datasets it trains on.

The smoke run checks every code path in seconds; the full run (marked slow) checks the targets the README states:
SFT at least 30 points above the untrained model, GRPO at least 5 above SFT, on >= 200 held-out problems, in at most
10 minutes on a 2-core CPU.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from posttrain import cli
from posttrain.data import builtin
from posttrain.models.presets import byte_level_tokenizer, quickstart_causal_lm
from posttrain.quickstart import FULL, RESULTS_FILE, evaluate
from posttrain.rewards import accuracy_reward

# ---- the built-in datasets ----


def test_splits_are_disjoint_deterministic_and_complete():
    train, test = builtin.problems("train"), builtin.problems("test")
    assert len(test) == builtin.NUM_TEST and len(train) + len(test) == (builtin.MAX_OPERAND + 1) ** 2
    assert not set(train) & set(test)
    assert builtin.problems("test") == test
    assert builtin.sft_dataset("train").to_list() == builtin.sft_dataset("train").to_list()
    with pytest.raises(ValueError, match="split 'dev' is not one of: train, test"):
        builtin.problems("dev")


def test_sft_demonstrations_forget_carries_at_the_stated_rate():
    rows = builtin.sft_dataset("train").to_list()
    carrying = forgotten = 0
    for (a, b), row in zip(builtin.problems("train"), rows):
        assert row["prompt"] == f"{a}+{b}="
        right, forgot = (
            row["completion"] == builtin.format_answer(a + b),
            row["completion"] == builtin.format_answer(a + b - 10),
        )
        assert right or (forgot and builtin.carries(a, b)), row
        carrying += builtin.carries(a, b)
        forgotten += forgot and not right
    assert abs(forgotten / carrying - builtin.CARRY_ERROR_RATE) < 0.03
    assert all(
        row["completion"] == builtin.format_answer(a + b)
        for (a, b), row in zip(builtin.problems("test"), builtin.sft_dataset("test").to_list())
    )
    assert builtin.sft_dataset("train", carry_error_rate=0.0)["completion"] == [
        builtin.format_answer(a + b) for a, b in builtin.problems("train")
    ]
    with pytest.raises(ValueError, match="carry_error_rate must be in"):
        builtin.sft_dataset(carry_error_rate=1.5)


def test_preference_pairs_and_prompts_agree_with_accuracy_reward():
    pairs = builtin.preference_dataset("test").to_list()
    prompts = builtin.prompt_dataset("test").to_list()
    solutions = [row["solution"] for row in prompts]
    assert [row["prompt"] for row in pairs] == [row["prompt"] for row in prompts]
    assert accuracy_reward([row["chosen"] for row in pairs], solution=solutions) == [1.0] * len(pairs)
    assert accuracy_reward([row["rejected"] for row in pairs], solution=solutions) == [0.0] * len(pairs)
    with pytest.raises(ValueError, match="trainer 'ppo' is not one of: sft, dpo, grpo"):
        builtin.builtin_dataset("ppo")


# ---- scoring ----


class _ScriptedModel(torch.nn.Module):
    """Answers each prompt with a fixed completion, so that exact-match scoring can be checked on known answers."""

    def __init__(self, tokenizer, answers: dict[str, str]):
        super().__init__()
        self.tokenizer, self.answers = tokenizer, answers
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return self.anchor.device

    def generate(self, input_ids, attention_mask, **kwargs):
        prompts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        texts = [self.answers[p] + self.tokenizer.eos_token for p in prompts]
        completions = self.tokenizer(texts, padding=True, return_tensors="pt")["input_ids"]
        return torch.cat([input_ids, completions], dim=1)


def test_evaluate_counts_exact_matches_only():
    tokenizer = byte_level_tokenizer()
    problems = [(47, 38), (1, 2), (10, 10), (5, 5)]
    answers = {"47+38=": "\\boxed{85}", "1+2=": "\\boxed{3} ", "10+10=": "\\boxed{020}", "5+5=": "\\boxed{10}"}
    model = _ScriptedModel(tokenizer, answers).train()
    assert evaluate(model, tokenizer, problems, "scripted", batch_size=3) == 0.5
    assert model.training  # the mode is restored


# ---- the quickstart itself ----


def test_smoke_run_writes_scores_and_checkpoints(capsys, tmp_path):
    assert cli.main(["quickstart", "--smoke", "--output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert all(0.0 <= results[stage] <= 1.0 for stage in ("base", "sft", "grpo"))
    assert results["smoke"] is True and results["num_test_problems"] == 16
    assert "exact match on 16 held-out problems" in out and "after GRPO" in out
    # SFT moves the weights; GRPO's may stay put in a smoke run, where no sampled answer is right yet
    initial, _ = quickstart_causal_lm(seed=0)
    sft = load_file(tmp_path / "sft" / "model.safetensors")
    assert any(not torch.equal(sft[name], param) for name, param in initial.state_dict().items() if name in sft)
    assert (tmp_path / "grpo" / "model.safetensors").is_file() and (tmp_path / "grpo" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_full_run_meets_the_targets(tmp_path):
    # as a user runs it: without the Triton interpreter that tests/conftest.py turns on for the CPU
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "posttrain.cli", "quickstart", "--output_dir", str(tmp_path)],
                            env=env, capture_output=True, text=True, check=False)  # fmt: skip
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert results["num_test_problems"] == FULL.num_test >= 200
    assert results["sft"] >= results["base"] + 0.30, results
    assert results["grpo"] >= results["sft"] + 0.05, results
    if not torch.cuda.is_available():
        assert seconds <= 600, seconds
