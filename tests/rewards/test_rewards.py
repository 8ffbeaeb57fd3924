"""posttrain.rewards: the built-in reward functions against TRL 1.16's, the name registry, and reward scoring."""

import asyncio
import math
import re
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from trl.rewards import accuracy_reward as trl_accuracy_reward
from trl.rewards import get_soft_overlong_punishment as trl_soft_overlong
from trl.rewards import think_format_reward as trl_think_format_reward

from posttrain.rewards import (
    accuracy_reward,
    get_reward_func,
    get_soft_overlong_punishment,
    resolve_reward_func,
    think_format_reward,
)
from posttrain.rewards.scoring import (
    RESERVED_COLUMNS,
    check_reward_columns,
    check_rewards,
    reward_func_name,
    score_completions,
)


def as_messages(texts):
    return [[{"role": "assistant", "content": t}] for t in texts]


ACCURACY_CASES = [
    (r"The answer is \boxed{\frac{1}{3}}", r"\frac{1}{3}"),
    (r"The answer is \boxed{\frac{1}{2}}", r"\frac{1}{3}"),
    (r"so $x = 4$", "4"),
    (r"\boxed{0.5}", r"$\frac{1}{2}$"),
    (r"\boxed{5 \text{ cm}}", "5"),
    ("no latex answer at all: 7", "7"),
    (r"first \boxed{2} then \boxed{3}", "3"),
    (r"\boxed{2}", "not a number or expression at all !!"),
    (r"\boxed{x^2+1}", "1 + x^2"),
]


def test_accuracy_reward_matches_trl():
    completions = as_messages([c for c, _ in ACCURACY_CASES])
    solutions = [s for _, s in ACCURACY_CASES]
    expected = trl_accuracy_reward(completions, solutions)
    assert accuracy_reward(completions, solutions) == expected
    assert 1.0 in expected and 0.0 in expected  # the cases exercise both outcomes


def test_accuracy_reward_unparseable_gold_is_none_and_standard_strings_work():
    rewards = accuracy_reward([r"\boxed{2}", r"\boxed{2}"], solution=["", "2"])
    assert rewards == [None, 1.0]


def test_accuracy_reward_logs_extra_columns():
    logged = {}
    accuracy_reward([r"\boxed{1}"], ["1"], log_extra=lambda column, values: logged.__setitem__(column, values))
    assert set(logged) == {"solution", "gold_parsed", "answer_parsed"}
    assert logged["solution"] == ["1"]


def test_accuracy_reward_length_mismatch():
    with pytest.raises(ValueError, match="2 completions but 1 solutions"):
        accuracy_reward(["a", "b"], ["1"])


THINK_CASES = [
    "<think>\nreasoning\n</think>\nanswer",
    "<think>reasoning</think>",
    "<think>\nreasoning\nanswer",
    "answer <think>late</think>",
    " <think>leading space</think>",
    "<think>one<think>two</think>",
    "<think></think></think>",
    "line\n<think>not at the start</think>",
    "",
]


@pytest.mark.parametrize("text", THINK_CASES, ids=range(len(THINK_CASES)))
def test_think_format_reward_matches_trl(text):
    assert think_format_reward(as_messages([text])) == trl_think_format_reward(as_messages([text]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["<think>", "</think>", "a", "\n", " ", "<", ">"]), max_size=8))
def test_think_format_reward_property(parts):
    text = "".join(parts)
    assert think_format_reward([text]) == trl_think_format_reward(as_messages([text]))


@pytest.mark.parametrize("cache", [0, 20, 100])
def test_soft_overlong_punishment_matches_trl(cache):
    ids = [[0] * n for n in (0, 1, 79, 80, 81, 90, 99, 100, 101, 250)]
    ours = get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=cache)
    assert ours(completion_ids=ids) == trl_soft_overlong(100, cache)(completion_ids=ids)
    assert ours.__name__ == "soft_overlong_punishment_reward"


def test_soft_overlong_punishment_validates():
    with pytest.raises(ValueError, match="soft_punish_cache"):
        get_soft_overlong_punishment(max_completion_len=10, soft_punish_cache=20)
    with pytest.raises(ValueError, match="max_completion_len"):
        get_soft_overlong_punishment(max_completion_len=0)
    assert get_soft_overlong_punishment(100).soft_punish_cache == 20


def test_registry_names_factories_and_dotted_paths():
    assert get_reward_func("accuracy_reward") is accuracy_reward
    assert get_reward_func("think_format_reward") is think_format_reward
    assert get_reward_func("posttrain.rewards.format.think_format_reward") is think_format_reward
    penalty = get_reward_func("soft_overlong_punishment", max_completion_len=250, unrelated_option=1)
    assert penalty(completion_ids=[[1] * 225]) == [-0.5]
    assert resolve_reward_func("Qwen/Qwen2-0.5B-Reward") is None  # left to GRPOTrainer to load as a reward model
    assert resolve_reward_func("posttrain.rewards.no_such_function") is None
    with pytest.raises(ValueError, match="neither one of: accuracy_reward"):
        get_reward_func("acuracy_reward")
    with pytest.raises(ValueError, match="missing: max_completion_len"):
        get_reward_func("soft_overlong_punishment")


def test_check_rewards_converts_and_rejects():
    assert check_rewards("f", [1, 0.5, None, True, torch.tensor(2.0)], 5)[:2] == [1.0, 0.5]
    assert math.isnan(check_rewards("f", [None], 1)[0])
    assert check_rewards("f", torch.tensor([1.0, 2.0]), 2) == [1.0, 2.0]
    with pytest.raises(ValueError, match="'f' returned 1 rewards for 2 completions"):
        check_rewards("f", [1.0], 2)
    with pytest.raises(TypeError, match="returned 'good' \\(str\\) for completion 1"):
        check_rewards("f", [1.0, "good"], 2)
    with pytest.raises(TypeError, match="must return a list of 2 floats"):
        check_rewards("f", 1.0, 2)


def test_score_completions_sync_async_and_errors():
    def length(completions, **kwargs):
        return [float(len(c)) for c in completions]

    async def uses_column(completions, answer, **kwargs):
        await asyncio.sleep(0)
        return [1.0 if c == a else None for c, a in zip(completions, answer)]

    def broken(**kwargs):
        raise KeyError("solution")

    common = {
        "prompts": ["p", "q"], "completions": ["ab", "c"], "completion_ids": [[1, 2], [3]],
        "columns": {"answer": ["ab", "x"]}, "model_scores": None, "device": "cpu",
    }  # fmt: skip
    rewards = score_completions([length, uses_column], ["length", "uses_column"], **common)
    assert rewards[:, 0].tolist() == [2.0, 1.0]
    assert rewards[0, 1].item() == 1.0 and math.isnan(rewards[1, 1].item())
    with pytest.raises(RuntimeError, match="reward function 'broken' raised KeyError"):
        score_completions([broken], ["broken"], **common)
    assert reward_func_name(uses_column) == "uses_column"
    assert reward_func_name(get_soft_overlong_punishment(10)) == "soft_overlong_punishment_reward"


def test_check_rewards_accepts_integer_and_float_scalars():
    values = [torch.tensor(2), torch.tensor(0.5), torch.tensor([3], dtype=torch.int32), np.int64(4), np.float32(1.5)]
    assert check_rewards("f", values, 5) == [2.0, 0.5, 3.0, 4.0, 1.5]
    assert check_rewards("f", torch.tensor([1, 0]), 2) == [1.0, 0.0]
    with pytest.raises(TypeError, match="returned tensor\\(\\[1, 2\\]\\) \\(Tensor\\) for completion 0"):
        check_rewards("f", [torch.tensor([1, 2])], 1)


def _scored(*funcs, columns=None):
    common = {"prompts": ["p", "q"], "completions": ["ab", "c"], "completion_ids": [[1, 2], [3]],
              "columns": columns or {}, "model_scores": None, "device": "cpu"}  # fmt: skip
    return score_completions(list(funcs), [f.__name__ for f in funcs], **common)


def test_an_infinite_reward_warns_naming_the_function():
    def explodes(completions, **kwargs):
        return [1.0, -math.inf]

    def fine(completions, **kwargs):
        return [0.0, 1.0]

    expected = "reward function 'explodes' returned an infinite reward (-inf) for 1 of 2 completions (e.g. prompt 'q'"
    with pytest.warns(UserWarning, match=re.escape(expected)):
        rewards = _scored(fine, explodes)
    assert rewards[1, 1].item() == -math.inf


def test_unscored_completions_warn_for_none_and_nan_alike():
    def abstains(completions, **kwargs):
        return [None, 1.0]

    def undefined(completions, **kwargs):
        return [math.nan, 2.0]

    with pytest.warns(UserWarning, match="every reward function returned None or NaN for 1 of 2 completions") as record:
        _scored(abstains, undefined)
    assert len(record) == 1 and "'p'" in str(record[0].message)

    def scores(completions, **kwargs):
        return [0.5, 2.0]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a completion scored by one function is scored
        _scored(abstains, scores)


@pytest.mark.parametrize("column", RESERVED_COLUMNS)
def test_a_column_named_like_a_reward_argument_is_refused(column):
    with pytest.raises(ValueError, match=f"train_dataset has a column named '{column}', which is also an argument"):
        check_reward_columns(["prompt", "solution", column], "train_dataset")


@pytest.mark.parametrize("column", ["prompts", "completions", "completion_ids"])
def test_score_completions_refuses_a_column_that_would_replace_the_samples(column):
    def length(completions, **kwargs):
        return [float(len(c)) for c in completions]

    with pytest.raises(ValueError, match=f"the batch has a column named '{column}'"):
        _scored(length, columns={column: ["x", "y"]})
