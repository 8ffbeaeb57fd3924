r"""Built-in datasets: two-digit addition, generated in code (deterministic, offline), for every trainer of the CLI.

A problem is "a+b=" with 0 <= a, b <= 99, answered as LaTeX's \boxed{}, which `accuracy_reward` reads:
"47+38=" -> "\boxed{85}". The 10,000 problems are split once by a fixed permutation: the first `NUM_TEST` are the
held-out "test" split, the rest "train".

The SFT demonstrations come from an imperfect demonstrator: on a share `carry_error_rate` of the problems whose units
digits carry, it forgets the carry ("47+38=" -> "\boxed{75}"). SFT learns to imitate it; GRPO, rewarded by the true
sum, learns to stop making the mistake. The preference pairs contrast the right sum with that same mistake (or, for a
problem without a carry, a spurious one). The test splits hold the right answers only. KTO trains on the same pairs
(its trainer unpairs them into desirable and undesirable examples), and so does the reward model, on "train" only.
RLOO trains on GRPO's prompts, and so does on-policy distillation (which reads the prompts only).

Example:
    >>> builtin_dataset("grpo")["test"][0]
    {'prompt': '97+70=', 'solution': '167'}
    >>> sft_dataset("train")[1]                       # a carry the demonstrator remembered
    {'prompt': '37+68=', 'completion': '\\boxed{105}'}
"""

import random

from datasets import Dataset, DatasetDict

MAX_OPERAND = 99
NUM_TEST = 500
CARRY_ERROR_RATE = 0.7
SPLITS = ("train", "test")

_SPLIT_SEED = 0
_DEMONSTRATOR_SEED = 1


def format_answer(total: int) -> str:
    r"""The completion that answers with `total`: "\boxed{<total>}"."""
    return f"\\boxed{{{total}}}"


def carries(a: int, b: int) -> bool:
    """Whether adding a and b carries out of the units digit."""
    return a % 10 + b % 10 >= 10


def problems(split: str) -> list[tuple[int, int]]:
    """The (a, b) pairs of a split: "test" (NUM_TEST problems) or "train" (the other 10,000 - NUM_TEST)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of: {', '.join(SPLITS)}")
    pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    random.Random(_SPLIT_SEED).shuffle(pairs)
    return pairs[:NUM_TEST] if split == "test" else pairs[NUM_TEST:]


def format_prompt(a: int, b: int) -> str:
    """The prompt of a problem: "47+38="."""
    return f"{a}+{b}="


def _demonstrated_sum(a: int, b: int, forget: bool) -> int:
    return a + b - 10 if forget and carries(a, b) else a + b


def sft_dataset(split: str = "train", carry_error_rate: float = CARRY_ERROR_RATE) -> Dataset:
    r"""Prompt-completion pairs {"prompt": "47+38=", "completion": "\boxed{85}"}.

    In "train", a carrying problem's demonstration forgets the carry with probability `carry_error_rate` (drawn from a
    fixed seed, so the dataset is the same every time); "test" completions are always right.
    """
    if not 0.0 <= carry_error_rate <= 1.0:
        raise ValueError(f"carry_error_rate must be in [0, 1], got {carry_error_rate!r}")
    rate = carry_error_rate if split == "train" else 0.0
    rng = random.Random(_DEMONSTRATOR_SEED)
    rows = [
        {"prompt": format_prompt(a, b), "completion": format_answer(_demonstrated_sum(a, b, rng.random() < rate))}
        for a, b in problems(split)
    ]
    return Dataset.from_list(rows)


def preference_dataset(split: str = "train") -> Dataset:
    r"""Preference pairs {"prompt": "47+38=", "chosen": "\boxed{85}", "rejected": "\boxed{75}"}: the right sum
    against the forgotten carry, or against a spurious carry (+10) for problems that do not carry."""
    rows = []
    for a, b in problems(split):
        wrong = a + b - 10 if carries(a, b) else a + b + 10
        rows.append({"prompt": format_prompt(a, b), "chosen": format_answer(a + b), "rejected": format_answer(wrong)})
    return Dataset.from_list(rows)


def prompt_dataset(split: str = "train") -> Dataset:
    """Prompts with the reference answer {"prompt": "47+38=", "solution": "85"}, the columns accuracy_reward reads."""
    return Dataset.from_list([{"prompt": format_prompt(a, b), "solution": str(a + b)} for a, b in problems(split)])


# Each trainer's dataset builder and splits
BUILTIN_DATASETS = {
    "sft": (sft_dataset, SPLITS),
    "dpo": (preference_dataset, SPLITS),
    "grpo": (prompt_dataset, SPLITS),
    "rloo": (prompt_dataset, SPLITS),
    "kto": (preference_dataset, SPLITS),
    "reward": (preference_dataset, ("train",)),
    "distillation": (prompt_dataset, SPLITS),
}
TRAINERS = tuple(BUILTIN_DATASETS)


def builtin_dataset(trainer: str) -> DatasetDict:
    """The built-in dataset for `trainer` (one of TRAINERS), with its splits: "train" and "test" ("train" only for
    "reward").

    Example:
        >>> builtin_dataset("kto")["train"].column_names
        ['prompt', 'chosen', 'rejected']
    """
    if trainer not in BUILTIN_DATASETS:
        raise ValueError(f"trainer {trainer!r} is not one of: {', '.join(TRAINERS)}")
    builder, splits = BUILTIN_DATASETS[trainer]
    return DatasetDict({split: builder(split) for split in splits})
