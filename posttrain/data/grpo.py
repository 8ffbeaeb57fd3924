"""GRPO's data side: prompt validation and tokenization, the grouped repeat sampler, generation-batch slicing."""

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import Sampler

from .common import is_conversational


class RepeatSampler(Sampler[int]):
    """Dataset indices arranged so that each prompt's completions land in one generation batch.

    The (optionally shuffled) indices are cut into chunks of `batch_size` prompts (an incomplete last chunk is
    dropped); each chunk is emitted `repeat_count` times in a row, and within it each index `mini_repeat_count` times
    in a row. With mini_repeat_count = num_generations, batch_size = prompts per generation batch and repeat_count =
    num_iterations x steps_per_generation, every data-loader batch of a chunk holds the same prompts, each repeated
    once per completion, which is the order TRL's GRPOTrainer draws prompts in (same seed, same order).

    Epoch e is shuffled by the (e + 1)-th permutation of a generator seeded with `seed`: the order TRL's sampler
    (seeded once, one permutation per epoch) draws in a straight run. `set_epoch` (which Trainer calls) picks the
    epoch, so a run resumed in a later epoch continues that order instead of replaying epoch 0's.

    Example:
        >>> list(RepeatSampler(range(4), mini_repeat_count=2, batch_size=2, repeat_count=2, shuffle=False))
        [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
    """

    def __init__(
        self,
        data_source: Sized,
        mini_repeat_count: int,
        batch_size: int = 1,
        repeat_count: int = 1,
        shuffle: bool = True,
        seed: int | None = None,
    ):
        self.num_samples = len(data_source)
        self.mini_repeat_count = mini_repeat_count
        self.batch_size = batch_size
        self.repeat_count = repeat_count
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the next iteration's order for `epoch` (0-based)."""
        self.epoch = epoch

    def _order(self) -> list[int]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        if not self.shuffle:
            return list(range(self.num_samples))
        generator = torch.Generator()
        if self.seed is not None:
            generator.manual_seed(self.seed)
        for _ in range(epoch + 1):
            order = torch.randperm(self.num_samples, generator=generator)
        return order.tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        num_chunks = self.num_samples // self.batch_size
        for c in range(num_chunks):
            chunk = order[c * self.batch_size : (c + 1) * self.batch_size]
            for _ in range(self.repeat_count):
                for index in chunk:
                    yield from [index] * self.mini_repeat_count

    def __len__(self) -> int:
        return (self.num_samples // self.batch_size) * self.batch_size * self.mini_repeat_count * self.repeat_count


def check_prompt_dataset(
    dataset, name: str, prompts_needed: int, trainer: str = "GRPOTrainer", reward_columns: bool = True
) -> None:
    """Fail early on a dataset an online trainer (`trainer`: GRPO, RLOO, Distillation) cannot train on: not a
    datasets.Dataset, no "prompt" column, a column named like an argument of the reward functions
    (posttrain.rewards.scoring.RESERVED_COLUMNS; only with `reward_columns`, for trainers that call reward functions),
    an empty or None prompt (naming its row), or fewer rows than one generation batch needs (`prompts_needed`), which
    would make the sampler yield nothing.

    Example:
        >>> check_prompt_dataset(Dataset.from_dict({"prompt": ["1+1=", ""]}), "train_dataset", 1)
        ValueError: train_dataset row 1: the prompt is empty (''): there is nothing to generate from ...
    """
    from datasets import Dataset, IterableDataset

    from posttrain.rewards.scoring import check_reward_columns

    if isinstance(dataset, IterableDataset):
        raise NotImplementedError(
            f"{name} is an IterableDataset, which posttrain's {trainer} does not support yet: pass a map-style "
            "datasets.Dataset (e.g. dataset = Dataset.from_list(list(iterable_dataset.take(n))))"
        )
    if not isinstance(dataset, Dataset):
        raise TypeError(f"{name} must be a datasets.Dataset, got {type(dataset).__name__}")
    if "prompt" not in dataset.column_names:
        raise ValueError(f"{name} has no 'prompt' column (columns: {', '.join(dataset.column_names) or 'none'})")
    if reward_columns:
        check_reward_columns(dataset.column_names, name)
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty: {trainer} needs at least one prompt")
    if len(dataset) < prompts_needed:
        raise ValueError(
            f"{name} has {len(dataset)} prompts, fewer than the {prompts_needed} one generation batch draws "
            "(generation_batch_size / num_generations): no batch could be formed"
        )
    row = _first_empty_prompt(dataset)
    if row is not None:
        prompt = dataset[row]["prompt"]
        raise ValueError(
            f"{name} row {row}: the prompt is {'None' if prompt is None else f'empty ({prompt!r})'}: there is nothing "
            "to generate from (a tokenizer without a BOS token gives it no token at all)"
        )


def _first_empty_prompt(dataset) -> int | None:
    """The index of the first prompt that is None, "" or an empty list of messages (computed in Arrow), or None."""
    import pyarrow as pa
    import pyarrow.compute as pc

    prompts = dataset.with_format("arrow")["prompt"]
    if pa.types.is_string(prompts.type) or pa.types.is_large_string(prompts.type):
        lengths = pc.utf8_length(prompts)
    elif pa.types.is_list(prompts.type) or pa.types.is_large_list(prompts.type):
        lengths = pc.list_value_length(prompts)
    else:
        return None  # another type fails in tokenize_prompts, with the value shown
    index = pc.index(pc.fill_null(lengths, 0), 0).as_py()
    return None if index < 0 else index


def tokenize_prompts(processing_class, prompts: list, chat_template_kwargs: dict | None = None) -> list[list[int]]:
    """Token ids of each prompt: a standard prompt is tokenized as is (with the tokenizer's special tokens, e.g. BOS);
    a conversational one goes through the chat template with the generation prompt appended.

    Example:
        >>> tokenize_prompts(tokenizer, [[{"role": "user", "content": "2+2?"}]])   # [[<|im_start|>, u, s, ...]]
    """
    if is_conversational({"prompt": prompts[0]}):
        encoded = processing_class.apply_chat_template(
            conversation=prompts, add_generation_prompt=True, tokenize=True, return_dict=True,
            **(chat_template_kwargs or {}),
        )  # fmt: skip
        return [list(ids) for ids in encoded["input_ids"]]
    if not all(isinstance(p, str) for p in prompts):
        bad = next(p for p in prompts if not isinstance(p, str))
        raise TypeError(
            f"a prompt must be a string or a list of chat messages, got {type(bad).__name__}: {bad!r:.80} (mixing "
            "standard and conversational prompts in one batch is not supported)"
        )
    return processing_class(text=prompts)["input_ids"]


def shuffle_batch(batch: dict) -> dict:
    """Permute every tensor (dim 0) and list of `batch` in unison; 0-d tensors and None are kept.

    Draws the permutation from torch's global generator (so that a seeded run reproduces TRL's order).
    """
    size = len(next(v for v in batch.values() if v is not None and not _is_scalar(v)))
    perm = torch.randperm(size)

    def permute(value):
        if value is None or _is_scalar(value):
            return value
        if isinstance(value, torch.Tensor):
            return value[perm]
        return [value[i] for i in perm]

    return {key: permute(value) for key, value in batch.items()}


def split_batch(batch: dict, num_chunks: int) -> list[dict]:
    """`batch` cut into `num_chunks` equal consecutive slices along dim 0 (0-d tensors and None repeated in each).

    Example:
        >>> split_batch({"x": torch.arange(4), "n": torch.tensor(7)}, 2)
        [{'x': tensor([0, 1]), 'n': tensor(7)}, {'x': tensor([2, 3]), 'n': tensor(7)}]
    """
    size = len(next(v for v in batch.values() if v is not None and not _is_scalar(v)))
    if size % num_chunks != 0:
        raise ValueError(f"a batch of {size} rows cannot be split into {num_chunks} equal parts")
    step = size // num_chunks

    def part(value, i):
        if value is None or _is_scalar(value):
            return value
        return value[i * step : (i + 1) * step]

    return [{key: part(value, i) for key, value in batch.items()} for i in range(num_chunks)]


def _is_scalar(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 0
