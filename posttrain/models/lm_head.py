"""The fused log-prob head: `model(..., logprob_labels=labels)` returns per-token log-probs instead of logits.

The head runs inside the model's own forward (the patched `model.forward`), so DDP, FSDP2 and PEFT wrappers see a
normal forward call: DDP's gradient hooks arm, FSDP2 unshards the head's parameters, PEFT's adapters apply.
"""

import functools
import types
import warnings
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from posttrain.ops import fused_linear_logprob, selective_log_softmax


@dataclass
class TokenLogprobOutput(ModelOutput):
    """What a patched model returns when called with `logprob_labels`.

    Every per-token field is [B, T - 1], aligned with labels[:, 1:] (the next-token targets), and 0 / False where that
    label is -100. logprobs and entropy are float32 and differentiable; mean_logit (mean over the vocabulary of the
    temperature-scaled logits), is_argmax (the label is the most likely token) and log_sum_sq_probs (log sum_v p_v^2)
    carry no gradient.
    """

    logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    mean_logit: torch.Tensor | None = None
    is_argmax: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None


def _logit_scale(config) -> float:
    # Models whose forward multiplies the logits (Cohere's logit_scale, Granite's 1 / logits_scaling)
    scale = getattr(config, "logit_scale", None)
    if scale is None and getattr(config, "logits_scaling", None):
        scale = 1.0 / config.logits_scaling
    return 1.0 if scale is None else float(scale)


def _check_not_zero3():
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise NotImplementedError(
            "use_fused_kernels=True does not support DeepSpeed ZeRO-3 yet (the head's weight is partitioned outside its "
            "module); use ZeRO-2, FSDP2, or set use_fused_kernels=False"
        )


def _full(param):
    # FSDP2 shards parameters as DTensors; gathering through full_tensor() keeps the gradient's reduce-scatter
    return param.full_tensor() if param is not None and hasattr(param, "full_tensor") else param


def _scatter(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    # masked_scatter stays differentiable (and connected to the model) even when no label is valid
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


def add_fused_logprob_head(
    model: torch.nn.Module,
    *,
    temperature: float = 1.0,
    entropy: bool = False,
    stats: bool = False,
    use_fused_kernels: bool = True,
) -> None:
    """Patch `model.forward` so that `model(input_ids, ..., logprob_labels=labels)` returns a `TokenLogprobOutput`.

    With use_fused_kernels, only the positions with a label != -100 go through `fused_linear_logprob` on the last
    hidden state and the LM head: no [B, T, V] logits. Without it (or for models that soft-cap their logits), the
    original forward's logits go through the torch log-softmax: the same numbers, the plain way. Calls without
    `logprob_labels` (e.g. generate) run the original forward.

    Args:
        model: a transformers causal LM (before PEFT wrapping or after; patch the underlying model).
        temperature: the logits are divided by it (GRPO's sampling temperature).
        entropy: also return the per-token entropy (differentiable).
        stats: also return mean_logit, is_argmax and log_sum_sq_probs (logits/*, token accuracy, WPO weights).

    Example:
        >>> add_fused_logprob_head(model, entropy=True)
        >>> out = model(input_ids=ids, attention_mask=mask, logprob_labels=labels)
        >>> loss = -out.logprobs.sum() / out.label_mask.sum()
    """
    original_forward = model.forward
    config = model.config.get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None)
    fused = use_fused_kernels and softcap is None
    if use_fused_kernels and softcap is not None:
        warnings.warn(
            f"final_logit_softcapping={softcap}: the fused log-prob kernel does not soft-cap, so this model's log-probs "
            "come from its full logits (more memory)",
            stacklevel=2,
        )
    effective_temperature = temperature / _logit_scale(config)

    @functools.wraps(type(model).forward)  # generate validates its kwargs against the original signature
    def forward(self, *args, logprob_labels=None, **kwargs):
        if logprob_labels is None:
            return original_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        labels = logprob_labels[:, 1:]
        if fused:
            _check_not_zero3()
            hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
            head = self.get_output_embeddings()
            return _fused_outputs(hidden, head, labels, effective_temperature, entropy, stats)
        logits = original_forward(*args, **kwargs).logits[:, :-1]
        return _plain_outputs(logits, labels, temperature, entropy, stats)

    model.forward = types.MethodType(forward, model)


def _fused_outputs(hidden, head, labels, temperature, entropy, stats) -> TokenLogprobOutput:
    # With device_map, the backbone may end on another device than the head
    hidden, labels = hidden.to(head.weight.device), labels.to(head.weight.device)
    mask = labels != -100
    result = fused_linear_logprob(
        hidden[mask], _full(head.weight), labels[mask], bias=_full(head.bias), temperature=temperature,
        return_entropy=entropy, return_stats=stats,
    )  # fmt: skip
    if stats:
        logprobs, ent, *extra = result
    else:
        (logprobs, ent), extra = (result if entropy else (result, None)), ()
    out = TokenLogprobOutput(
        logprobs=_scatter(mask, logprobs), entropy=_scatter(mask, ent) if ent is not None else None, label_mask=mask
    )
    for name, values in zip(("mean_logit", "is_argmax", "log_sum_sq_probs"), extra):
        setattr(out, name, _scatter(mask, values))
    return out


def _plain_outputs(logits, labels, temperature, entropy, stats) -> TokenLogprobOutput:
    mask = labels != -100
    result = selective_log_softmax(logits, labels, temperature=temperature, return_entropy=entropy, impl="torch")
    logprobs, ent = result if entropy else (result, None)
    out = TokenLogprobOutput(logprobs=logprobs, entropy=ent, label_mask=mask)
    if stats:
        with torch.no_grad():
            z = logits.float() / temperature
            out.mean_logit = torch.where(mask, z.mean(-1), 0.0)
            out.is_argmax = (logits.argmax(-1) == labels) & mask
            out.log_sum_sq_probs = torch.where(mask, torch.logsumexp(2.0 * z, -1) - 2.0 * torch.logsumexp(z, -1), 0.0)
    return out
