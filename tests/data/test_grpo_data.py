"""GRPO's dataset checks: reserved column names and empty prompts fail at construction, naming the column or row."""

import re

import pytest
from datasets import Dataset

import posttrain
from posttrain.data.grpo import check_prompt_dataset
from posttrain.rewards.scoring import RESERVED_COLUMNS

PROMPTS = ["1+1=", "2+2=", "3+3=", "4+4="]


@pytest.mark.parametrize("column", RESERVED_COLUMNS)
def test_a_column_named_like_a_reward_argument_is_refused(column):
    dataset = Dataset.from_dict({"prompt": PROMPTS, column: ["x"] * 4})
    with pytest.raises(ValueError, match=f"train_dataset has a column named '{column}', which is also an argument"):
        check_prompt_dataset(dataset, "train_dataset", 1)


@pytest.mark.parametrize(
    "prompts, expected",
    [
        (["1+1=", ""], "train_dataset row 1: the prompt is empty ('')"),
        (["1+1=", None], "train_dataset row 1: the prompt is None"),
        ([[{"role": "user", "content": "1+1="}], []], "train_dataset row 1: the prompt is empty ([])"),
    ],
    ids=["empty-string", "None", "no-messages"],
)
def test_an_empty_prompt_is_named(prompts, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        check_prompt_dataset(Dataset.from_dict({"prompt": prompts}), "train_dataset", 1)


def test_a_valid_dataset_passes():
    check_prompt_dataset(Dataset.from_dict({"prompt": PROMPTS, "solution": ["2", "4", "6", "8"]}), "train_dataset", 2)
    check_prompt_dataset(Dataset.from_dict({"prompt": [[{"role": "user", "content": " "}]]}), "eval_dataset", 1)


def test_grpo_trainer_refuses_a_completions_column_before_training(tiny_model_dir, tmp_path):
    """TRL 1.16 fails at the first step ('got multiple values for keyword argument'); posttrain used to pass the
    column to the reward functions in place of the sampled completions."""

    def reward(completions, **kwargs):
        return [float(len(c)) for c in completions]

    args = posttrain.GRPOConfig(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=2,
                                max_completion_length=4, report_to="none", bf16=False)  # fmt: skip
    dataset = Dataset.from_dict({"prompt": PROMPTS, "completions": ["a", "b", "c", "d"]})
    with pytest.raises(ValueError, match="train_dataset has a column named 'completions'"):
        posttrain.GRPOTrainer(tiny_model_dir, reward, args=args, train_dataset=dataset)
