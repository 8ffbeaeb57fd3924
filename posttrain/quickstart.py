r"""`posttrain quickstart`: SFT then GRPO on the built-in addition task, from a freshly initialized model, offline.

1. The untrained quickstart model (`quickstart_causal_lm`) is scored on the held-out problems.
2. SFT on the demonstrations of `posttrain.data.builtin` (which forget the carry in 70 percent of the carrying
   problems) teaches the answer format and addition, mistakes included.
3. GRPO with `accuracy_reward` (the true sum) from the SFT checkpoint trains the mistake away.

Each stage is scored by exact match of the greedy completion against "\boxed{<sum>}" on the held-out problems; the
scores and both checkpoints are written to the output directory.
"""

import contextlib
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from posttrain.data.builtin import (
    MAX_OPERAND,
    NUM_TEST,
    format_answer,
    format_prompt,
    problems,
    prompt_dataset,
    sft_dataset,
)
from posttrain.models.presets import quickstart_causal_lm

RESULTS_FILE = "quickstart_results.json"
# The longest answer, "\boxed{198}", one token per byte with the byte-level tokenizer, plus the end-of-sequence token
MAX_ANSWER_TOKENS = len(format_answer(2 * MAX_OPERAND)) + 1


@dataclass(frozen=True)
class Recipe:
    """Steps, batch sizes and learning rates of the two stages (tuned on a 2-core CPU; see the README)."""

    sft_steps: int = 1000
    sft_batch_size: int = 64
    sft_learning_rate: float = 1e-3
    grpo_steps: int = 150
    grpo_prompts_per_step: int = 8
    num_generations: int = 8
    grpo_learning_rate: float = 3e-5
    num_test: int = NUM_TEST


FULL = Recipe()
# Every code path in seconds, for tests; its scores mean nothing
SMOKE = Recipe(sft_steps=4, sft_batch_size=8, grpo_steps=2, grpo_prompts_per_step=2, num_generations=2, num_test=16)


def run_quickstart(output_dir: str | os.PathLike, *, smoke: bool = False, seed: int = 0) -> dict:
    """Train and score the three stages; write `output_dir`/quickstart_results.json and the checkpoints
    `output_dir`/sft and `output_dir`/grpo.

    Returns:
        {"base": float, "sft": float, "grpo": float (exact-match accuracies in [0, 1]), "num_test_problems": int,
        "seconds": {"sft", "grpo", "total"}, "device": str, "seed": int, "smoke": bool, "recipe": dict,
        "checkpoints": {"sft": path, "grpo": path}}.

    Example:
        >>> results = run_quickstart("quickstart-out")
        >>> results["sft"] > results["base"], results["grpo"] > results["sft"]
        (True, True)
    """
    recipe = SMOKE if smoke else FULL
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    test = problems("test")[: recipe.num_test]
    start = time.perf_counter()
    with _cpu_threads(), warnings.catch_warnings():
        # transformers 5.2x renamed TRL's gradient_checkpointing field, which the configs set, and warns about it
        warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning)
        scores, seconds, device = _train_and_score(recipe, test, output_dir, seed)
    results = {
        **scores,
        "num_test_problems": len(test),
        "seconds": {**seconds, "total": time.perf_counter() - start},
        "device": device,
        "seed": seed,
        "smoke": smoke,
        "recipe": asdict(recipe),
        "checkpoints": {"sft": str(output_dir / "sft"), "grpo": str(output_dir / "grpo")},
    }
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    print(results_table(results))
    print(f"\nResults: {output_dir / RESULTS_FILE}; checkpoints: {output_dir / 'sft'}, {output_dir / 'grpo'}")
    return results


def _train_and_score(recipe: Recipe, test: list[tuple[int, int]], output_dir: Path, seed: int):
    """({"base", "sft", "grpo"} accuracies, {"sft", "grpo"} training seconds, the device trained on)."""
    _banner(f"1/3  the untrained model, on {len(test)} held-out problems")
    model, tokenizer = quickstart_causal_lm(seed=seed)
    scores = {"base": evaluate(model, tokenizer, test, "untrained")}

    _banner(f"2/3  SFT: {recipe.sft_steps} steps on imperfect demonstrations")
    start = time.perf_counter()
    model = _train_sft(model, tokenizer, recipe, output_dir / "sft", seed)
    seconds = {"sft": time.perf_counter() - start}
    scores["sft"] = evaluate(model, tokenizer, test, "after SFT")

    _banner(f"3/3  GRPO: {recipe.grpo_steps} steps rewarded by accuracy_reward")
    start = time.perf_counter()
    model = _train_grpo(output_dir / "sft", recipe, output_dir / "grpo", seed)
    seconds["grpo"] = time.perf_counter() - start
    scores["grpo"] = evaluate(model, tokenizer, test, "after GRPO")
    return scores, seconds, str(model.device)


@torch.no_grad()
def evaluate(model, tokenizer, test: list[tuple[int, int]], label: str, batch_size: int = 250) -> float:
    r"""Exact-match accuracy of `model`'s greedy completions: the completion must be "\boxed{a+b}" and nothing else.

    Args:
        model: a causal LM (any device); tokenizer: its tokenizer; test: (a, b) problems; label: for the progress bar.

    Returns:
        The fraction of problems answered exactly, in [0, 1].

    Example:
        >>> model, tokenizer = quickstart_causal_lm()
        >>> evaluate(model, tokenizer, [(47, 38)], "untrained")
        0.0
    """
    was_training = model.training
    model.eval()
    correct = 0
    for first in tqdm(range(0, len(test), batch_size), desc=f"Scoring the model {label}", unit="batch"):
        batch = test[first : first + batch_size]
        inputs = tokenizer(
            [format_prompt(a, b) for a, b in batch], return_tensors="pt", padding=True, padding_side="left"
        )
        inputs = inputs.to(model.device)
        output = model.generate(
            **inputs, do_sample=False, max_new_tokens=MAX_ANSWER_TOKENS, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        completions = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(text == format_answer(a + b) for (a, b), text in zip(batch, completions))
    model.train(was_training)
    return correct / len(test)


def results_table(results: dict) -> str:
    """The three scores as a small text table."""
    rows = [("untrained model", results["base"]), ("after SFT", results["sft"]), ("after GRPO", results["grpo"])]
    header = f"exact match on {results['num_test_problems']} held-out problems"
    width = max(len(name) for name, _ in rows)
    lines = ["", header, "-" * len(header)]
    lines += [f"{name:<{width}}  {100 * score:5.1f}%" for name, score in rows]
    return "\n".join(lines)


def _common_args(output_dir: Path, steps: int, seed: int) -> dict:
    return {
        "output_dir": str(output_dir),
        "max_steps": steps,
        "seed": seed,
        "bf16": False,  # the recipe is tuned in float32; the model is too small for bf16 to pay
        "gradient_checkpointing": False,
        "logging_steps": max(1, steps // 5),
        "save_strategy": "no",
        "report_to": "none",
        "dataloader_pin_memory": torch.cuda.is_available(),
    }


def _train_sft(model, tokenizer, recipe: Recipe, output_dir: Path, seed: int):
    from posttrain import SFTConfig, SFTTrainer

    args = SFTConfig(
        per_device_train_batch_size=recipe.sft_batch_size,
        learning_rate=recipe.sft_learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, recipe.sft_steps // 20),
        **_common_args(output_dir, recipe.sft_steps, seed),
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=sft_dataset("train"), processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(output_dir))
    return trainer.model


def _train_grpo(sft_checkpoint: Path, recipe: Recipe, output_dir: Path, seed: int):
    from posttrain import GRPOConfig, GRPOTrainer
    from posttrain.rewards import accuracy_reward

    args = GRPOConfig(
        per_device_train_batch_size=recipe.grpo_prompts_per_step * recipe.num_generations,
        num_generations=recipe.num_generations,
        learning_rate=recipe.grpo_learning_rate,
        max_completion_length=MAX_ANSWER_TOKENS,
        **_common_args(output_dir, recipe.grpo_steps, seed),
    )
    trainer = GRPOTrainer(
        model=str(sft_checkpoint), reward_funcs=accuracy_reward, args=args, train_dataset=prompt_dataset("train")
    )
    trainer.train()
    trainer.save_model(str(output_dir))
    return trainer.model


@contextlib.contextmanager
def _cpu_threads():
    """One intra-op thread on the CPU unless OMP_NUM_THREADS says otherwise: this model's matrices are too small to
    split, and on a busy machine OpenMP's waiting threads made each step ten times slower."""
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)
