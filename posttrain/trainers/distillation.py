"""DistillationTrainer: TRL 1.16's on-policy distillation (same arguments, metrics and loss) on posttrain's shared
online trainer and its fused linear divergence."""

import inspect
from typing import ClassVar

import torch
from accelerate.utils import gather_object

from posttrain.configs.distillation import DistillationConfig
from posttrain.models.lm_head import HeadDivergence, divergence_unsupported, logit_scale
from posttrain.models.loading import create_model, resolve_model
from posttrain.models.sharding import prepare_for_inference

from .online import OnlineTrainer, completion_labels


class DistillationTrainer(OnlineTrainer):
    """On-policy knowledge distillation, a drop-in for TRL 1.16's `DistillationTrainer`.

    The student samples one completion per prompt (the shared generation of `posttrain.trainers.online`:
    transformers' `generate` or vLLM) and is trained to match a frozen teacher's next-token distributions on those
    completions, under TRL's generalized Jensen-Shannon divergence at `temperature` over the full vocabulary: beta = 0
    the forward KL(teacher || student), 1 the reverse KL(student || teacher), in between the JSD. The divergence runs
    in the student's forward (`HeadDivergence`, so DDP / FSDP / PEFT see a normal call) through
    `posttrain.ops.fused_linear_divergence` on the student's and the teacher's last hidden states and LM heads: no
    [tokens, vocabulary] logits of either model. The loss is its sum over the completion tokens divided by the
    generation batch's completion-token count (per process), so gradient accumulation does not change the update.

    Args:
        model: the student: a hub id or local path (loaded with args.model_init_kwargs), or a causal LM (PEFT ok).
        teacher_model: a hub id / path (loaded with args.teacher_model_init_kwargs and teacher_model_revision; default
            args.teacher_model_name_or_path) or a causal LM. It must share the student's vocabulary; its hidden size
            may differ. It is frozen and placed for inference by the accelerator (a DeepSpeed engine, FSDP shards).
        args: a posttrain DistillationConfig (default: DistillationConfig("<model name>-Distillation")).
        train_dataset / eval_dataset: datasets.Dataset with a "prompt" column, standard or conversational.
        processing_class: the student's tokenizer (default: the model's, left padding and truncation).
        callbacks, optimizers: as transformers.Trainer. quantization_config: added to model_init_kwargs.
        peft_config: wraps the student with an adapter (not on lm_head).
        tools: accepted for signature compatibility; not supported (error if set).

    Models whose forward rescales the logits (Cohere's logit_scale, Granite's logits_scaling, ...) are distilled on
    their rescaled logits, as TRL; soft-capped logits (Gemma 2) or an LM head that is not a plain linear layer raise
    NotImplementedError.

    Logged (TRL's names): loss, entropy (the student's mean per-token entropy at the temperature), completions/
    mean_length, /min_length, /max_length, /clipped_ratio, /mean_terminated_length, /min_terminated_length,
    /max_terminated_length, num_tokens, step_time.

    Example:
        >>> from posttrain import DistillationTrainer
        >>> trainer = DistillationTrainer(model="Qwen/Qwen2.5-0.5B-Instruct",
        ...                               teacher_model="Qwen/Qwen2.5-1.5B-Instruct",
        ...                               train_dataset=dataset)
        >>> trainer.train()
    """

    config_class = DistillationConfig
    trainer_suffix = "Distillation"
    scores_rewards = False
    loss_is_scaled_for_ga = True  # divided by the generation batch's token count, as TRL
    _tag_names: ClassVar[list[str]] = ["posttrain", "distillation"]

    def __init__(
        self,
        model,
        teacher_model=None,
        args: DistillationConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
    ):
        args = self.resolve_args(model, args)
        self._check_vllm(args)
        self._refuse_tools(args, tools=tools)
        model, processing_class = self._load_policy(model, args, processing_class, peft_config, quantization_config)
        self._check_datasets(train_dataset, eval_dataset, args)
        teacher = self._load_teacher(teacher_model, args)
        _check_models(model, teacher)
        self._init_online(model, args, train_dataset, eval_dataset, processing_class, callbacks, optimizers)
        self.teacher_model = prepare_for_inference(teacher, self.accelerator)
        unwrapped = self.accelerator.unwrap_model(self.teacher_model)
        self._teacher_backbone, self._teacher_head = unwrapped.base_model, unwrapped.get_output_embeddings()
        # only the hidden states are needed: logits for one position where the forward can skip the others
        keeps_logits = "logits_to_keep" in inspect.signature(unwrapped.forward).parameters
        self._teacher_kwargs = {"logits_to_keep": 1} if keeps_logits else {}
        self._scales = tuple(logit_scale(m.config.get_text_config()) for m in (self.policy_lm, unwrapped))
        self._start_generation(args)

    @staticmethod
    def _load_teacher(teacher_model, args):
        teacher_model = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        if teacher_model is None:
            raise ValueError(
                "DistillationTrainer needs a teacher: pass teacher_model (a causal LM, hub id or path) or set "
                "teacher_model_name_or_path in the config"
            )
        if not isinstance(teacher_model, str):
            if args.teacher_model_init_kwargs is not None:
                raise ValueError(
                    "teacher_model_init_kwargs only apply to a teacher given as a hub id or path, and this teacher is "
                    "already built: pass it as a string, or drop teacher_model_init_kwargs"
                )
            teacher = resolve_model(teacher_model, None, field_name="teacher_model")
        else:
            kwargs = {"dtype": "auto", **(args.teacher_model_init_kwargs or {})}
            if args.teacher_model_revision is not None:
                kwargs.setdefault("revision", args.teacher_model_revision)
            if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
                kwargs["device_map"] = None
            kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            teacher = create_model(teacher_model, kwargs)
        teacher.eval()
        teacher.requires_grad_(False)
        return teacher

    # ---- one generation batch ----

    def _generate_and_score_completions(self, inputs: list[dict]) -> dict:
        mode = self._mode()
        rollout = self._rollout(inputs, mode)
        if self.args.log_completions:
            # TRL logs the prompts as the decoded prompt tokens (the chat template applied)
            prompts = self.processing_class.batch_decode(rollout.batch["prompt_ids"], skip_special_tokens=True)
            completions = self.processing_class.batch_decode(rollout.batch["completion_ids"], skip_special_tokens=True)
            self._logs["prompt"].extend(gather_object(prompts))
            self._logs["completion"].extend(gather_object(completions))
        return rollout.batch

    # ---- loss ----

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The divergence summed over the micro-batch's completion tokens, divided by the generation batch's token
        count per process in training (gradient-accumulation and DDP correct, as TRL), by the micro-batch's own in
        evaluation; logs the student's entropy."""
        if return_outputs:
            raise ValueError("DistillationTrainer.compute_loss cannot return outputs: it computes no logits")
        mask = inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], mask], dim=1)
        labels = completion_labels(input_ids, attention_mask, mask.shape[1])
        divergence = HeadDivergence(
            self._teacher_hidden(input_ids, attention_mask), self._teacher_head, beta=self.args.beta,
            temperature=self.args.temperature, student_scale=self._scales[0], teacher_scale=self._scales[1],
        )  # fmt: skip
        out = self._completion_outputs(
            model, input_ids, labels, attention_mask=attention_mask, head_divergence=divergence
        )
        if self.model.training:
            loss = out.loss / (inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes)
        else:
            loss = out.loss / out.label_mask.sum().clamp(min=1)
        self._log_mean("entropy", out.entropy.sum(), out.label_mask.sum(), self._mode())
        return loss

    @torch.no_grad()
    def _teacher_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The teacher's last hidden states [B, T - 1, Ht] (before each next token), from a call of the teacher
        itself, so that its engine (DeepSpeed, FSDP) gathers its weights; its logits are kept for one position only."""
        captured = []
        hook = self._teacher_backbone.register_forward_hook(lambda module, args, out: captured.append(out[0]))
        try:
            with self.accelerator.autocast():
                self.teacher_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                   **self._teacher_kwargs)  # fmt: skip
        finally:
            hook.remove()
        return captured[-1][:, :-1]


def _check_models(student, teacher) -> None:
    """The divergence compares full next-token distributions: one vocabulary, logits the fused op can reproduce."""
    student_vocab = student.config.get_text_config().vocab_size
    teacher_vocab = teacher.config.get_text_config().vocab_size
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"the student's vocab_size is {student_vocab} but the teacher's is {teacher_vocab}: distillation compares "
            "the full next-token distributions, which needs one shared vocabulary (the same tokenizer)"
        )
    for role, model in (("student", student), ("teacher", teacher)):
        model = model.get_base_model() if hasattr(model, "get_base_model") else model
        reason = divergence_unsupported(model)
        if reason is not None:
            raise NotImplementedError(
                f"the {role} ({type(model).__name__}) cannot be distilled by posttrain's DistillationTrainer: {reason}"
            )
