"""Trainer-step rows: SFT, DPO, GRPO, KTO and Reward training tokens/s and peak memory, posttrain against TRL 1.16 on
the same random Qwen2-0.5B-shaped model and data (the longest sequence each fits: benchmarks/memory.py).

SFT: packed 2048-token rows, 8 per step. DPO: 8 pairs of 1024-token sequences. GRPO: one prompt's 8 generations of
1024 completion tokens, the training step only (generation excluded: a prepared batch goes straight to the loss).
KTO: 8 unpaired 1024-token examples, half desirable (loss "kto": each step also runs the policy without gradient and
the reference on the 8 mismatched prompt-completion sequences of the KL estimate; tokens/s counts the 8 examples
only). Reward: 8 pairs of 1024-token sequences through the sequence classifier (the checkpoint with a new score head).
A Setup changes the batch and adds config fields or trainer arguments (the memory search's variants).
"""

import gc
import importlib
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from transformers import TrainerCallback

from benchmarks.providers import importable
from benchmarks.sink import Recorder, past
from posttrain.models import byte_level_tokenizer, tiny_qwen2_config

QWEN2_05B = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=131072, tie_word_embeddings=True, rope_theta=1000000.0,
)  # fmt: skip
LIBRARIES = ("posttrain", "trl")
GRPO_PROMPT_LEN = 128


@dataclass(frozen=True)
class Setup:
    """A step's settings beyond the library's defaults: sequences (DPO: pairs) per step, extra config fields (e.g.
    activation_offloading=True; SFT packs its rows unless packing=False) and extra trainer arguments (peft_config)."""

    batch: int = 8
    config: dict = field(default_factory=dict)
    trainer_kwargs: dict = field(default_factory=dict)


DEFAULT_SETUP = Setup()


class _StepTimer(TrainerCallback):
    """Wall time of each optimizer step (the device synchronized at both ends)."""

    def __init__(self):
        self.times, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        sync_device()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        sync_device()
        self.times.append(time.perf_counter() - self._start)


def sync_device():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def model_config(smoke: bool) -> tuple[dict, torch.dtype]:
    """The benchmark model's config fields and dtype: Qwen2-0.5B's shape in bf16, or the tiny Qwen2 in fp32 (smoke)."""
    if smoke:
        return {k: v for k, v in tiny_qwen2_config().to_dict().items() if k in QWEN2_05B}, torch.float32
    return QWEN2_05B, torch.bfloat16


def model_label(smoke: bool) -> str:
    return "tiny-qwen2 (smoke)" if smoke else "Qwen2-0.5B-shaped, random, bf16"


def save_model(config_kwargs: dict, dtype, root: str) -> str:
    """A random-weight Qwen2 with `config_kwargs` in `dtype`, and the byte-level tokenizer, saved under `root`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(**config_kwargs, pad_token_id=256, eos_token_id=258)).to(dtype)
    model.save_pretrained(root)
    byte_level_tokenizer().save_pretrained(root)
    del model
    return root


def _random_text(n_chars: int, seed: int) -> str:
    gen = torch.Generator().manual_seed(seed)
    return "".join(chr(ord("a") + i) for i in torch.randint(0, 26, (n_chars,), generator=gen).tolist())


def _sft_data(seq_len: int, rows: int, packed: bool) -> Dataset:
    # packed: two sequences of seq_len / 2 tokens fill each row exactly; else one sequence per row (the EOS appended
    # makes seq_len tokens)
    gen = torch.Generator().manual_seed(0)
    shape = (2 * rows, seq_len // 2 - 1) if packed else (rows, seq_len - 1)
    return Dataset.from_dict({"input_ids": torch.randint(0, 256, shape, generator=gen).tolist()})


def _dpo_data(seq_len: int, pairs: int) -> Dataset:
    # the byte-level tokenizer makes one token per character; prompt and completion take half the sequence each
    half = seq_len // 2 - 1
    columns = ("prompt", "chosen", "rejected")
    return Dataset.from_list([{c: _random_text(half, 3 * i + j) for j, c in enumerate(columns)} for i in range(pairs)])


def _kto_data(seq_len: int, examples: int) -> Dataset:
    # unpaired examples, desirable and undesirable in turn (the balance KTO's default weights assume)
    half = seq_len // 2 - 1
    return Dataset.from_list([
        {"prompt": _random_text(half, 2 * i), "completion": _random_text(half, 2 * i + 1), "label": i % 2 == 0}
        for i in range(examples)
    ])  # fmt: skip


def _common_args(output_dir: str, steps: int, device_type: str, batch: int = 8, **extra):
    return dict(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-6,
        logging_steps=10**6, save_strategy="no", report_to="none", bf16=device_type == "cuda",
        use_cpu=device_type != "cuda", disable_tqdm=True, seed=0, **extra,
    )  # fmt: skip


def _train_tokens_per_s(trainer_cls, config_cls, model_dir, data, tokens_per_step, steps, warmup, device_type,
                        setup: Setup, **config_extra):  # fmt: skip
    """(tokens/s over the steps after `warmup`, peak MB) of trainer.train() for `steps` steps."""
    with tempfile.TemporaryDirectory() as out:
        args = config_cls(**_common_args(out, steps, device_type, setup.batch, **{**config_extra, **setup.config}))
        timer = _StepTimer()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = trainer_cls(model=model_dir, args=args, train_dataset=data, callbacks=[timer],
                                  **setup.trainer_kwargs)  # fmt: skip
            reset_peak()
            trainer.train()
        peak = peak_allocated_mb()
    del trainer
    free_memory()
    timed = timer.times[warmup:] or timer.times
    return tokens_per_step * len(timed) / sum(timed), peak


def reset_peak():
    sync_device()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_allocated_mb():
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def sft_step(library, model_dir, seq_len, steps, warmup, device_type, setup=DEFAULT_SETUP):
    module = importlib.import_module(library)
    packed = setup.config.get("packing", True)
    data = _sft_data(seq_len, setup.batch * steps, packed)
    return _train_tokens_per_s(
        module.SFTTrainer, module.SFTConfig, model_dir, data, setup.batch * seq_len, steps, warmup, device_type, setup,
        packing=packed, max_length=seq_len,
    )  # fmt: skip


def dpo_step(library, model_dir, seq_len, steps, warmup, device_type, setup=DEFAULT_SETUP):
    module = importlib.import_module(library)
    return _train_tokens_per_s(
        module.DPOTrainer, module.DPOConfig, model_dir, _dpo_data(seq_len, setup.batch * steps),
        2 * setup.batch * seq_len, steps, warmup, device_type, setup, max_length=seq_len,
    )  # fmt: skip


def kto_step(library, model_dir, seq_len, steps, warmup, device_type, setup=DEFAULT_SETUP):
    module = importlib.import_module(library)
    return _train_tokens_per_s(
        module.KTOTrainer, module.KTOConfig, model_dir, _kto_data(seq_len, setup.batch * steps),
        setup.batch * seq_len, steps, warmup, device_type, setup, max_length=seq_len,
    )  # fmt: skip


def reward_step(library, model_dir, seq_len, steps, warmup, device_type, setup=DEFAULT_SETUP):
    """A reward model's step: prompt + chosen and prompt + rejected (seq_len - 1 tokens each with the EOS appended,
    under max_length, which drops longer pairs rather than truncating them)."""
    module = importlib.import_module(library)
    return _train_tokens_per_s(
        module.RewardTrainer, module.RewardConfig, model_dir, _dpo_data(seq_len, setup.batch * steps),
        2 * setup.batch * seq_len, steps, warmup, device_type, setup, max_length=seq_len,
    )  # fmt: skip


def _grpo_batch(prompt_len: int, completion_len: int, generations: int, device) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (generations, prompt_len + completion_len), generator=gen).to(device)
    completion_mask = torch.ones(generations, completion_len, dtype=torch.long, device=device)
    return {
        "prompt_ids": ids[:, :prompt_len],
        "prompt_mask": torch.ones(generations, prompt_len, dtype=torch.long, device=device),
        "completion_ids": ids[:, prompt_len:],
        "completion_mask": completion_mask,
        "advantages": torch.randn(generations, generator=gen).to(device),
        "num_items_in_batch": completion_mask.sum(),
    }


def grpo_step(library, model_dir, completion_len, steps, warmup, device_type, setup=DEFAULT_SETUP,
              prompt_len=GRPO_PROMPT_LEN):  # fmt: skip
    """The GRPO training step without generation: compute_loss + backward + optimizer step on a prepared batch of
    setup.batch generations of prompt_len + completion_len tokens."""
    module = importlib.import_module(library)
    # a valid config (TRL needs >= 2 generations per prompt); the step trains on the prepared batch alone
    generations = max(setup.batch, 2)
    with tempfile.TemporaryDirectory() as out:
        args = module.GRPOConfig(**_common_args(out, steps, device_type, generations, num_generations=generations,
                                                max_completion_length=completion_len, **setup.config))  # fmt: skip
        prompts = Dataset.from_dict({"prompt": ["a"] * 16})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = module.GRPOTrainer(model=model_dir, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                                         args=args, train_dataset=prompts, **setup.trainer_kwargs)  # fmt: skip
        trainer.create_optimizer_and_scheduler(num_training_steps=steps)
        trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop would set
        model = trainer.model
        model.train()
        batch = _grpo_batch(prompt_len, completion_len, setup.batch, trainer.accelerator.device)
        reset_peak()
        times = []
        for _ in range(steps):
            sync_device()
            start = time.perf_counter()
            with trainer.compute_loss_context_manager():
                loss = trainer.compute_loss(model, batch)
            trainer.accelerator.backward(loss)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad()
            sync_device()
            times.append(time.perf_counter() - start)
        peak = peak_allocated_mb()
    del trainer, model
    free_memory()
    timed = times[warmup:] or times
    return setup.batch * (prompt_len + completion_len) * len(timed) / sum(timed), peak


STEPS = {"sft": sft_step, "dpo": dpo_step, "grpo": grpo_step, "kto": kto_step, "reward": reward_step}
SEQ_LEN = {"sft": 2048, "dpo": 1024, "grpo": 1024, "kto": 1024, "reward": 1024}
SMOKE_SEQ_LEN = {"sft": 64, "dpo": 32, "grpo": 16, "kto": 32, "reward": 32}


def _prefix(library: str) -> str:
    return "" if library == "posttrain" else f"{library}_"


def _measure(step, library, model_dir, seq_len, steps, warmup, device_type) -> dict:
    prefix = _prefix(library)
    try:
        tokens_per_s, peak = step(library, model_dir, seq_len, steps, warmup, device_type)
        return {f"{prefix}tokens_per_s": tokens_per_s, f"{prefix}peak_mb": peak}
    except torch.cuda.OutOfMemoryError:
        error = "out of memory"
    except Exception as err:  # one broken trainer must not sink the others' rows
        error = f"{type(err).__name__}: {err}"[:300]
    free_memory()
    return {f"{prefix}tokens_per_s": None, f"{prefix}peak_mb": None, f"{prefix}error": error}


def run_trainers(device, recorder: Recorder, smoke: bool = False, deadline=None) -> None:
    """Trainer rows into `recorder` (kind "trainer", one record per measurement; report.merged_trainer_rows joins
    them): tokens/s and peak MB for posttrain and TRL, trainer by trainer in STEPS' order, until `deadline`."""
    if not importable("trl"):
        recorder.note("trainers: skipped, trl is not installed (pip install 'posttrain[dev]')")
        return
    device_type = torch.device(device).type
    config, dtype = model_config(smoke)
    seq = SMOKE_SEQ_LEN if smoke else SEQ_LEN
    steps, warmup = (2, 0) if smoke else (6, 2)
    with tempfile.TemporaryDirectory() as root:
        path = save_model(config, dtype, root)
        model_name = model_label(smoke)
        for name, step in STEPS.items():
            row = {"kind": "trainer", "trainer": name, "model": model_name, "seq_len": seq[name]}
            for library in LIBRARIES:
                if past(deadline):
                    recorder.note(f"trainers: deadline reached before {name} with {library}")
                    return
                row.update(_measure(step, library, path, seq[name], steps, warmup, device_type))
                recorder.record(dict(row))
                tokens_per_s, peak = row[f"{_prefix(library)}tokens_per_s"], row[f"{_prefix(library)}peak_mb"]
                recorder.log(f"[trainers] {name:<5} {library:<10} {_fmt(tokens_per_s)} tokens/s, peak {_fmt(peak)} MB")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:,.0f}"
