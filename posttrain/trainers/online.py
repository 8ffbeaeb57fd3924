"""What the online trainers share: completions sampled from the policy during training, then learned from.

`OnlineTrainer` (GRPO, RLOO, Distillation): the RepeatSampler data loaders that deliver one generation batch of raw
prompts at a time, the buffer that feeds it to steps_per_generation x num_iterations micro-steps (checkpointed, so a
resumed run continues exactly), the prompts' tokenization, sampling through the generation backends
(`posttrain.trainers.generation`), decoding, TRL's completions/* metrics, log-prob passes through the fused head,
step_time, completion logging and TRL's NaN-aware metric averaging.

`GroupRolloutTrainer` (GRPO, RLOO): groups of num_generations completions per prompt, scored by reward functions
(callables, reward models, built-in names), TRL's reward metrics, the old-policy and reference log-probs, the reference
model. A subclass keeps its advantages, its loss and its metrics.
"""

import importlib.util
import math
import os
import time
import warnings
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import ClassVar

import torch
from accelerate.utils import gather, gather_object, is_peft_model, set_seed
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

from posttrain.data.common import is_conversational, pad
from posttrain.data.grpo import RepeatSampler, check_prompt_dataset, shuffle_batch, split_batch, tokenize_prompts
from posttrain.losses.grpo import nanstd
from posttrain.models.loading import create_model, trainer_model_kwargs
from posttrain.rewards.registry import resolve_reward_func
from posttrain.rewards.scoring import reward_func_name, reward_model_scores, score_completions

from .base import PosttrainTrainer, no_grad_without_checkpointing, router_aux_loss_setup
from .generation import Completions, create_generation

BUFFER_FILE = "grpo_generation_batch_{}.pt"  # one per process


class SamplerEpochCallback(TrainerCallback):
    """Gives the train sampler its epoch as each epoch starts.

    Trainer's own `set_epoch` does not reach it in a run resumed mid-epoch on several processes: accelerate's
    `skip_first_batches` wraps the sharded batch sampler one level deeper than `DataLoaderShard.set_epoch` looks, so
    the resumed epoch would replay epoch 0's order. The trainer's state holds e + k / n there (k of n batches done)."""

    def __init__(self, trainer: "OnlineTrainer"):
        self._trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        sampler = self._trainer._train_sampler
        if sampler is not None:
            sampler.set_epoch(int(state.epoch or 0))


def _to_device(batches: list[dict], device) -> list[dict]:
    return [{key: value.to(device) if torch.is_tensor(value) else value for key, value in b.items()} for b in batches]


def completion_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_width: int) -> torch.Tensor:
    """Labels for the completion tokens alone (the last completion_width columns, where the mask is on)."""
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :-completion_width] = -100
    return labels


def _keep_examples(batch: list[dict]) -> list[dict]:
    """The data collator: online trainers work on the raw examples (prompts are tokenized after sampling)."""
    return batch


@dataclass
class Rollout:
    """One generation batch of this process, sampled and padded.

    prompts / completions: the raw prompts and the decoded completions (assistant messages for conversational
    prompts); completion_ids: each completion's token ids; sampled: what the backend returned; batch: prompt_ids,
    prompt_mask (left-padded), completion_ids, completion_mask (right-padded; truncated completions masked out with
    mask_truncated_completions) and num_items_in_batch (the completion tokens of every process's generation batch).
    """

    prompts: list
    completions: list
    completion_ids: list[list[int]]
    sampled: Completions
    batch: dict


class OnlineTrainer(PosttrainTrainer):
    """Base of the trainers that sample their own training completions (see the module docstring).

    A subclass builds itself in this order: resolve_args, `_load_policy` (seed, model, tokenizer, eos ids, PEFT),
    its own setup, `_init_online` (Trainer, fused head, logs), its reference / teacher model, `_start_generation`
    (per-process seed, the generation backend). Its config gives num_generations, num_iterations,
    steps_per_generation and generation_batch_size (fields, or properties where TRL's config has none). It implements
    `_generate_and_score_completions(inputs) -> batch` and compute_loss.
    """

    tokenizer_kwargs = {"padding_side": "left", "truncation_side": "left"}  # noqa: RUF012  (read-only)
    resumable_attributes = ("_step",)
    # Whether a PEFT model's reference is the model with its adapters disabled (a KL term against the initial policy)
    uses_reference_model: ClassVar[bool] = False

    # ---- construction ----

    def _load_policy(self, model, args, processing_class, peft_config, quantization_config):
        """The policy (loaded, PEFT-wrapped) and its processing class; sets self.eos_token_ids."""
        model = self.load_model(model, args, quantization_config)
        processing_class = self.load_processing_class(model, processing_class, args)
        self.eos_token_ids = self._eos_token_ids(model)
        if self.uses_reference_model and peft_config is None and is_peft_model(model) and args.beta != 0.0:
            warnings.warn(
                "beta != 0 with an already-wrapped PeftModel: the reference log-probs come from the model with its "
                "adapters disabled (TRL copies the initial adapter as the reference instead)",
                stacklevel=3,
            )
        return self.wrap_peft(model, peft_config, args), processing_class

    def _eos_token_ids(self, model) -> list[int]:
        """The ids that end a completion: every eos id the model declares (e.g. an end-of-turn token), plus the
        tokenizer's."""
        declared = model.generation_config.eos_token_id
        declared = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
        tokenizer_eos = self._tokenizer.eos_token_id
        for attribute in ("response_template", "response_schema"):
            if getattr(self._tokenizer, attribute, None) is not None:
                warnings.warn(
                    f"the tokenizer has a {attribute}: TRL parses conversational completions with it, posttrain "
                    "decodes them as plain text (the assistant message's content)",
                    stacklevel=4,
                )
        return declared if tokenizer_eos in declared else [tokenizer_eos, *declared]

    @staticmethod
    def _check_vllm(args) -> None:
        # the server mode's client needs vLLM only for NCCL weight transfer, checked when the server says so
        if args.use_vllm and args.vllm_mode == "colocate" and importlib.util.find_spec("vllm") is None:
            raise ImportError("use_vllm=True but vllm is not installed: pip install 'posttrain[vllm]'")

    def _refuse_tools(self, args, **trainer_args) -> None:
        for name, value in trainer_args.items():
            if value:
                raise NotImplementedError(
                    f"{name} (tool use / custom rollouts) is not supported by posttrain's {type(self).__name__}"
                )
        if getattr(args, "max_tool_calling_iterations", None) is not None:
            warnings.warn(f"max_tool_calling_iterations={args.max_tool_calling_iterations} has no effect without tools",
                          stacklevel=3)  # fmt: skip

    # Whether the trainer passes the dataset's columns to reward functions (whose argument names they must not take)
    scores_rewards = True

    @classmethod
    def _check_datasets(cls, train_dataset, eval_dataset, args):
        if train_dataset is None:
            raise ValueError("train_dataset is required (a datasets.Dataset with a 'prompt' column)")
        options = {"trainer": cls.__name__, "reward_columns": cls.scores_rewards}
        check_prompt_dataset(
            train_dataset, "train_dataset", args.generation_batch_size // args.num_generations, **options
        )
        evals = eval_dataset.items() if isinstance(eval_dataset, dict) else [("eval_dataset", eval_dataset)]
        for name, dataset in evals:
            if dataset is not None:
                label = name if name == "eval_dataset" else f"eval_dataset[{name!r}]"
                check_prompt_dataset(dataset, label, 1, **options)

    def _init_online(self, model, args, train_dataset, eval_dataset, processing_class, callbacks, optimizers,
                     **head_options) -> None:  # fmt: skip
        """transformers.Trainer's construction, the fused head (`head_options`), the step counters and the logs."""
        self.num_generations = args.num_generations
        self.num_generations_eval = getattr(args, "num_generations_eval", None) or args.num_generations
        self.num_iterations = args.num_iterations
        self._step = 0  # micro-steps (one per training_step call), across gradient accumulation
        self._buffered_inputs = None
        self._step_time = 0.0
        self._train_sampler = None
        super().__init__(
            model=model, args=args, data_collator=_keep_examples, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks, optimizers=optimizers,
        )  # fmt: skip
        self.finish_setup(args, **head_options)
        self.add_callback(SamplerEpochCallback(self))
        self._ops_impl = "auto" if args.use_fused_kernels else "torch"
        self._logs = self._empty_completion_logs(args.generation_batch_size)

    def _start_generation(self, args) -> None:
        """The generation backend, after a per-process seed (processes must not sample identical completions)."""
        set_seed(args.seed, device_specific=True)
        self._generation = create_generation(self.model, args, self._tokenizer, self.eos_token_ids, self.accelerator)
        self.model.add_model_tags(self._tag_names)
        if args.log_completions:
            self._check_completion_logging(args)

    def _check_completion_logging(self, args):
        backends = [name for name in ("wandb", "trackio") if name in (args.report_to or [])]
        if backends or args.log_unique_prompts:
            warnings.warn(
                f"log_completions writes output_dir/completions/*.parquet and prints the samples; posttrain does not "
                f"send the completions table to {', '.join(backends) or 'a logging backend'} (so log_unique_prompts "
                "has no effect)",
                stacklevel=3,
            )
        if self.accelerator.is_main_process:
            os.makedirs(os.path.join(args.output_dir, "completions"), exist_ok=True)

    @staticmethod
    def _empty_completion_logs(size: int) -> dict:
        return {
            "prompt": deque(maxlen=size),
            "completion": deque(maxlen=size),
            "rewards": defaultdict(lambda: deque(maxlen=size)),
            "advantages": deque(maxlen=size),
            "extra": defaultdict(lambda: deque(maxlen=size)),
        }

    # ---- data ----

    def _set_signature_columns_if_needed(self):
        # with remove_unused_columns=True, only the prompt survives (the model's forward signature is irrelevant)
        if self._signature_columns is None:
            self._signature_columns = ["prompt"]

    def get_train_dataloader(self):
        # Each loader batch is a whole generation batch of this process: completions are sampled once for all the
        # steps_per_generation micro-steps it feeds (see _prepare_inputs)
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self._train_batch_size * self.args.steps_per_generation,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _get_train_sampler(self, dataset=None):
        self._train_sampler = RepeatSampler(
            dataset if dataset is not None else self.train_dataset,
            mini_repeat_count=self.num_generations,
            batch_size=self.args.generation_batch_size // self.num_generations,
            repeat_count=self.num_iterations * self.args.steps_per_generation,
            shuffle=self.args.shuffle_dataset,
            seed=self.args.seed,
        )
        return self._train_sampler

    def _get_eval_sampler(self, eval_dataset):
        return RepeatSampler(eval_dataset, mini_repeat_count=self.num_generations_eval, seed=self.args.seed)

    def _prepare_inputs(self, generation_batch):
        if not self.model.training:  # evaluation: one generation per batch, no reuse
            return self._generate_and_score_completions(generation_batch)
        steps = self.args.steps_per_generation
        if self._step % (steps * self.num_iterations) == 0 or self._buffered_inputs is None:
            scored = shuffle_batch(self._generate_and_score_completions(generation_batch))
            self._buffered_inputs = split_batch(scored, steps)
        return self._buffered_inputs[self._step % steps]

    def _generate_and_score_completions(self, inputs: list[dict]) -> dict:
        raise NotImplementedError

    # ---- generation ----

    def _rollout(self, inputs: list[dict], mode: str) -> Rollout:
        """Tokenize this process's prompts, sample one completion each, decode, pad, log the completions/* metrics."""
        prompts = [example["prompt"] for example in inputs]
        prompt_ids_list = tokenize_prompts(self.processing_class, prompts, self.args.chat_template_kwargs)
        sampled = self._sample(prompt_ids_list, mode)
        completion_ids_list = sampled.ids
        completions = self._decode(prompts, completion_ids_list)
        is_truncated = self._log_lengths(mode, prompt_ids_list, completion_ids_list)

        prompt_ids, prompt_mask = self._pad_ids(prompt_ids_list, "left")
        completion_ids, completion_mask = self._pad_ids(completion_ids_list, "right")
        if getattr(self.args, "mask_truncated_completions", False):
            completion_mask = completion_mask * (~is_truncated).unsqueeze(1).int()
        batch = {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "num_items_in_batch": self.accelerator.gather(completion_mask.sum()).sum(),
        }
        return Rollout(prompts, completions, completion_ids_list, sampled, batch)

    def _sample(self, prompt_ids: list[list[int]], mode: str) -> Completions:
        """One completion per prompt (each prompt comes num_generations times in a row), with the sampler's log-probs
        when it reports them. An engine with its own weights (vLLM) first gets the policy's, once per optimizer step."""
        self._generation.sync_weights(self.model, self.state.global_step)
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        return self._generation.generate(self.model_wrapped, prompt_ids, num_generations)

    def _decode(self, prompts: list, completion_ids: list[list[int]]) -> list:
        texts = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        if is_conversational({"prompt": prompts[0]}):
            return [[{"role": "assistant", "content": text}] for text in texts]
        return texts

    def _pad_ids(self, ids: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [torch.tensor(x, dtype=torch.long) for x in ids]
        multiple = self.args.pad_to_multiple_of
        padded = pad(rows, self._tokenizer.pad_token_id, side, multiple).to(self.accelerator.device)
        mask = pad([torch.ones_like(r) for r in rows], 0, side, multiple).to(self.accelerator.device)
        return padded, mask

    def _log_lengths(self, mode, prompt_ids, completion_ids) -> torch.Tensor:
        """Log TRL's completions/* and num_tokens metrics; returns this process's [B] truncation flags."""
        device = self.accelerator.device
        prompt_lengths = self.accelerator.gather(torch.tensor([len(x) for x in prompt_ids], device=device))
        lengths = self.accelerator.gather(torch.tensor([len(x) for x in completion_ids], device=device)).float()
        if mode == "train":
            self.state.num_input_tokens_seen += (prompt_lengths.sum() + lengths.sum()).item()
        metrics = self._metrics[mode]
        metrics["num_tokens"] = [self.state.num_input_tokens_seen]
        metrics["completions/mean_length"].append(lengths.mean().item())
        metrics["completions/min_length"].append(lengths.min().item())
        metrics["completions/max_length"].append(lengths.max().item())
        stops = {*self.eos_token_ids, self._tokenizer.pad_token_id}
        is_truncated = torch.tensor([not ids or ids[-1] not in stops for ids in completion_ids], device=device)
        all_truncated = self.accelerator.gather(is_truncated)
        metrics["completions/clipped_ratio"].append(all_truncated.float().mean().item())
        terminated = lengths[~all_truncated] if (~all_truncated).any() else lengths.new_zeros(1)
        metrics["completions/mean_terminated_length"].append(terminated.mean().item())
        metrics["completions/min_terminated_length"].append(terminated.min().item())
        metrics["completions/max_terminated_length"].append(terminated.max().item())
        return is_truncated

    # ---- log-probs through the fused head ----

    def _completion_outputs(self, model, input_ids, labels, *, attention_mask, aux_loss=False, **head):
        """The patched forward (fused LM head, no full logits) over prompt + completion, with the completion tokens as
        labels (`completion_labels`): a TokenLogprobOutput ([B, T - 1] fields; the completion is the last C columns).
        `head` is head_loss / head_divergence for the forward that computes the loss. As TRL, the model gets the
        attention mask but no position ids."""
        router = {"output_router_logits": True} if aux_loss else {}
        with self.accelerator.autocast():
            return model(input_ids=input_ids, attention_mask=attention_mask, logprob_labels=labels, **head, **router)

    def _token_logprobs(self, model, input_ids, attention_mask, num_completion_tokens, *, batch_size=None):
        """Per-token log-probs [B, C] of the last C positions (the completion) under `model`, computed `batch_size`
        rows at a time (no gradient tracked by the caller)."""
        C = num_completion_tokens
        batch_size = batch_size or input_ids.shape[0]
        logps = []
        for start in range(0, input_ids.shape[0], batch_size):
            ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
            out = self._completion_outputs(model, ids, completion_labels(ids, mask, C), attention_mask=mask)
            logps.append(out.logprobs[:, -C:])
        return torch.cat(logps)

    # ---- training, evaluation ----

    def training_step(self, model, inputs, num_items_in_batch=None):
        start = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step += 1
        self._step_time += time.perf_counter() - start
        if self._step % self.current_gradient_accumulation_steps == 0:
            self._metrics["train"]["step_time"].append(self._step_time)
            self._step_time = 0.0
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.mean().detach(), None, None

    def _mode(self) -> str:
        return "train" if self.model.training else "eval"

    def _log_mean(self, name: str, total: torch.Tensor, count: torch.Tensor, mode: str) -> None:
        """Log sum(total) / sum(count) over the processes (a token mean: entropy, kl)."""
        totals = self.accelerator.reduce(torch.stack([total.detach().float(), count.detach().float()]), reduction="sum")
        self._metrics[mode][name].append((totals[0] / totals[1].clamp(min=1.0)).item())

    # ---- logging and checkpoints ----

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = self._mode()
        # NaN values (e.g. a reward function that returned None for a whole batch) are left out of the averages; a
        # metric with nothing else to average is logged as None, as TRL does
        empty = []
        for key, values in self._metrics[mode].items():
            kept = [v for v in values if not math.isnan(v)]
            if values and not kept:
                empty.append(key)
            values[:] = kept
        prefix = "eval_" if mode == "eval" else ""
        logs.update({prefix + key: None for key in empty})
        super().log(logs, start_time)
        if self.args.log_completions and self.accelerator.is_main_process:
            self._write_completions()

    def _write_completions(self):
        import pandas as pd

        table = {
            "step": [self.state.global_step] * len(self._logs["prompt"]),
            "prompt": list(self._logs["prompt"]),
            "completion": list(self._logs["completion"]),
            **{name: list(values) for name, values in self._logs["rewards"].items()},
            **{name: list(values) for name, values in self._logs["extra"].items()},
        }
        if self._logs["advantages"]:
            table["advantage"] = list(self._logs["advantages"])
        frame = pd.DataFrame(table)
        path = os.path.join(self.args.output_dir, "completions", f"completions_{self.state.global_step:05d}.parquet")
        frame.to_parquet(path)
        shown = frame if self.args.num_completions_to_print is None else frame.head(self.args.num_completions_to_print)
        print(shown.drop(columns=["step"]).to_string(max_colwidth=80))

    def save_extra_state(self, folder: str) -> None:
        super().save_extra_state(folder)
        # the generation batch still in use (num_iterations > 1, or steps_per_generation beyond the accumulation)
        buffered = _to_device(self._buffered_inputs, "cpu") if self._buffered_inputs is not None else None
        torch.save(buffered, os.path.join(folder, BUFFER_FILE.format(self.accelerator.process_index)))

    def load_extra_state(self, checkpoint: str) -> None:
        super().load_extra_state(checkpoint)
        path = os.path.join(checkpoint, BUFFER_FILE.format(self.accelerator.process_index))
        if os.path.exists(path):
            buffered = torch.load(path, weights_only=True)
            self._buffered_inputs = _to_device(buffered, self.accelerator.device) if buffered is not None else None


class GroupRolloutTrainer(OnlineTrainer):
    """OnlineTrainer for GRPO and RLOO: num_generations completions per prompt scored by reward functions, the
    old-policy and reference log-prob passes, the reference model (see the module docstring).

    A subclass implements `_advantages(rewards [B_all, R], batch, mode) -> [B_all]` (logging its reward metrics with
    `_log_reward_metrics`) and compute_loss; it may extend `_logprob_passes` (GRPO's sampling correction) and
    `_needs_old_logprobs`.
    """

    uses_reference_model = True

    def _init_group(self, model, args, processing_class, peft_config, quantization_config, reward_funcs,
                    reward_processing_classes, train_dataset, eval_dataset):  # fmt: skip
        """The policy, its tokenizer and the reward sources, checked; returns (model, processing_class)."""
        model, processing_class = self._load_policy(model, args, processing_class, peft_config, quantization_config)
        self.router_aux_loss_coef, self.aux_loss_enabled = router_aux_loss_setup(model, args.router_aux_loss_coef)
        self.reward_funcs, self.reward_func_names = self._load_reward_funcs(reward_funcs, args)
        self.reward_weights = self._reward_weights(args)
        self.reward_processing_classes = self._reward_tokenizers(reward_processing_classes, args)
        self._check_datasets(train_dataset, eval_dataset, args)
        self.epsilon_low = args.epsilon
        self.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        self.beta = args.beta
        self._pending_extra_logs = defaultdict(list)
        self._pending_metrics = defaultdict(list)
        return model, processing_class

    def _finish_group(self, args, model_source, quantization_config) -> None:
        """After _init_online: the reference model, the generation backend, the reward models placed."""
        self.ref_model = self._build_ref_model(model_source, args, quantization_config)
        self._start_generation(args)
        self._prepare_reward_models()

    # ---- reward sources ----

    def _load_reward_funcs(self, reward_funcs, args) -> tuple[list, list[str]]:
        if reward_funcs is None or (isinstance(reward_funcs, list) and not reward_funcs):
            raise ValueError("reward_funcs is required: a reward function, a reward model, or a list of them")
        funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        for i, func in enumerate(funcs):
            if isinstance(func, str):
                named = resolve_reward_func(func, max_completion_len=args.max_completion_length)
                funcs[i] = named if named is not None else self._load_reward_model(func, args)
            elif not (isinstance(func, torch.nn.Module) or callable(func)):
                raise TypeError(
                    f"reward_funcs[{i}] must be a callable, a reward model or a string, got {type(func).__name__}"
                )
        return funcs, [reward_func_name(f) for f in funcs]

    def _load_reward_model(self, path: str, args):
        kwargs = {"device_map": None, **trainer_model_kwargs(args), "num_labels": 1}
        try:
            return create_model(path, kwargs, architecture=AutoModelForSequenceClassification)
        except OSError as err:
            raise ValueError(
                f"reward function {path!r} is not a built-in reward name, an importable dotted path, nor a loadable "
                f"reward model: {err}"
            ) from err

    def _reward_weights(self, args) -> torch.Tensor:
        if args.reward_weights is None:
            return torch.ones(len(self.reward_funcs), dtype=torch.float32)
        if len(args.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(args.reward_weights)} weights but there are {len(self.reward_funcs)} "
                f"reward functions ({', '.join(self.reward_func_names)})"
            )
        return torch.tensor(args.reward_weights, dtype=torch.float32)

    def _reward_tokenizers(self, classes, args) -> list:
        n = len(self.reward_funcs)
        classes = [None] * n if classes is None else list(classes) if isinstance(classes, (list, tuple)) else [classes]
        if len(classes) != n:
            raise ValueError(f"reward_processing_classes has {len(classes)} entries for {n} reward functions")
        for i, func in enumerate(self.reward_funcs):
            if not isinstance(func, torch.nn.Module):
                continue
            if classes[i] is None:
                classes[i] = AutoTokenizer.from_pretrained(
                    func.config._name_or_path, trust_remote_code=args.trust_remote_code
                )
            if classes[i].pad_token_id is None:
                classes[i].pad_token = classes[i].eos_token
            # the reward model scores the last non-pad token, so it must know the pad id
            func.config.get_text_config().pad_token_id = classes[i].pad_token_id
        return classes

    def _prepare_reward_models(self):
        for i, func in enumerate(self.reward_funcs):
            if isinstance(func, torch.nn.Module):
                self.reward_funcs[i] = self.accelerator.prepare_model(func, evaluation_mode=True, device_placement=True)

    def _build_ref_model(self, model_source, args, quantization_config):
        """A frozen copy of the initial policy when beta != 0; None with beta == 0 (no KL term) or PEFT (the
        reference is the policy with its adapters disabled)."""
        if args.beta == 0.0 or is_peft_model(self.model):
            if args.sync_ref_model:
                raise ValueError(
                    f"sync_ref_model=True needs a reference model, which {type(self).__name__} builds only with beta "
                    "!= 0 and without PEFT (there, the reference is the model with its adapters disabled)"
                )
            return None
        reference = self.create_reference_model(model_source, args, quantization_config)
        return self.prepare_reference_model(reference, args, temperature=args.temperature)

    # ---- one generation batch ----

    def _generate_and_score_completions(self, inputs: list[dict]) -> dict:
        mode = self._mode()
        rollout = self._rollout(inputs, mode)
        batch = rollout.batch
        self._logprob_passes(batch, rollout.sampled, mode)
        rewards = self._calculate_rewards(inputs, rollout.prompts, rollout.completions, rollout.completion_ids)
        advantages = self._advantages(rewards, batch, mode)
        start = self.accelerator.process_index * len(rollout.prompts)
        batch["advantages"] = advantages[start : start + len(rollout.prompts)]
        self._record_completions(rollout.prompts, rollout.completions, rewards, advantages, mode)
        return batch

    def _advantages(self, rewards: torch.Tensor, batch: dict, mode: str) -> torch.Tensor:
        raise NotImplementedError

    def _logprob_passes(self, batch: dict, sampled: Completions, mode: str) -> None:
        """Add the no-grad log-prob passes to `batch`: old_per_token_logps and ref_per_token_logps."""
        batch.update(self._reference_logprobs(batch, mode))

    def _needs_old_logprobs(self, batch: dict) -> bool:
        # Unless generation happens exactly at optimizer-step boundaries, the policy has moved since sampling; the
        # sampling correction compares the sampler with the trainer at sampling time
        generate_every = self.args.steps_per_generation * self.num_iterations
        misaligned = self.args.gradient_accumulation_steps % generate_every != 0
        return misaligned or (self.args.vllm_importance_sampling_correction and "sampling_per_token_logps" in batch)

    def _reference_logprobs(self, batch: dict, mode: str) -> dict:
        """old_per_token_logps (when `_needs_old_logprobs`) and ref_per_token_logps (beta != 0)."""
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        args = (input_ids, attention_mask, batch["completion_ids"].shape[1])
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        out = {}
        unwrapped = self.accelerator.unwrap_model(self.model)
        with no_grad_without_checkpointing(unwrapped, self.args.gradient_checkpointing_kwargs):
            if self._needs_old_logprobs(batch):
                out["old_per_token_logps"] = self._token_logprobs(self.model, *args, batch_size=batch_size)
            if self.beta != 0.0:
                if self.ref_model is not None:
                    out["ref_per_token_logps"] = self._token_logprobs(self.ref_model, *args, batch_size=batch_size)
                else:
                    with unwrapped.disable_adapter():
                        out["ref_per_token_logps"] = self._token_logprobs(self.model, *args, batch_size=batch_size)
        return out

    # ---- rewards ----

    def _log_completion_extra(self, column: str, values: list) -> None:
        """Add a column to the completions log; reward functions get it as the `log_extra` keyword argument."""
        self._pending_extra_logs[column].extend(values)

    def _log_metric(self, name: str, value: float) -> None:
        """Log a scalar (averaged per logging step); reward functions get it as the `log_metric` keyword argument."""
        self._pending_metrics[name].append(value)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids) -> torch.Tensor:
        """Rewards [B_all, R] of every process's completions (gathered: groups may span processes), NaN for None."""
        device = self.accelerator.device
        columns = {key: [x[key] for x in inputs] for key in inputs[0] if key not in ("prompt", "completion",
                                                                                      "completion_ids")}  # fmt: skip
        columns.update(trainer_state=self.state, log_extra=self._log_completion_extra, log_metric=self._log_metric)

        def model_scores(i):
            tokenizer = self.reward_processing_classes[i]
            if is_conversational({"prompt": prompts[0]}):
                texts = [
                    tokenizer.apply_chat_template(p + c, tokenize=False, **(self.args.chat_template_kwargs or {}))
                    for p, c in zip(prompts, completions)
                ]
            else:
                texts = [p + c for p, c in zip(prompts, completions)]
            return reward_model_scores(self.reward_funcs[i], tokenizer, texts, device)

        rewards = score_completions(
            self.reward_funcs, self.reward_func_names, prompts=prompts, completions=completions,
            completion_ids=completion_ids, columns=columns, model_scores=model_scores, device=device,
        )  # fmt: skip
        return gather(rewards)

    def _log_reward_metrics(self, rewards: torch.Tensor, zero_std: torch.Tensor, mode: str) -> None:
        """TRL's reward metrics: rewards/<name>/mean and /std, reward and reward_std (of the weighted sum, NaN where
        every function returned None), frac_reward_zero_std (the mean of the `zero_std` flags)."""
        metrics = self._metrics[mode]
        for i, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"].append(torch.nanmean(rewards[:, i]).item())
            metrics[f"rewards/{name}/std"].append(nanstd(rewards[:, i]).item())
        total = self._weighted_rewards(rewards)
        metrics["reward"].append(torch.nanmean(total).item())
        metrics["reward_std"].append(nanstd(total).item())
        metrics["frac_reward_zero_std"].append(zero_std.float().mean().item())

    def _weighted_rewards(self, rewards: torch.Tensor) -> torch.Tensor:
        """sum_k w_k rewards[:, k] over the functions that scored, NaN where none did ([B_all])."""
        total = (rewards * self.reward_weights.to(rewards.device)).nansum(dim=1)
        total[torch.isnan(rewards).all(dim=1)] = math.nan
        return total

    def _record_completions(self, prompts, completions, rewards, advantages, mode):
        """Keep the latest samples for log_completions; flush what reward functions logged through log_extra and
        log_metric (gathered over processes, in a fixed key order so that every process gathers the same keys)."""
        self._logs["prompt"].extend(gather_object(prompts))
        self._logs["completion"].extend(gather_object(completions))
        for i, name in enumerate(self.reward_func_names):
            self._logs["rewards"][name].extend(rewards[:, i].tolist())
        self._logs["advantages"].extend(advantages.tolist())
        for column in sorted(set(gather_object(list(self._pending_extra_logs)))):
            values = self._pending_extra_logs.get(column, [None] * len(prompts))
            self._logs["extra"][column].extend(gather_object(values))
        self._pending_extra_logs.clear()
        for name in sorted(set(gather_object(list(self._pending_metrics)))):
            values = self._pending_metrics.get(name, [])
            stats = torch.tensor([sum(values), len(values)], dtype=torch.float32, device=self.accelerator.device)
            total, count = self.accelerator.gather(stats).view(-1, 2).sum(dim=0).tolist()
            self._metrics[mode][name].append(total / count)
        self._pending_metrics.clear()
