"""The fused log-prob head: `model(..., logprob_labels=labels)` returns per-token log-probs instead of logits.

The head runs inside the model's own forward (the patched `model.forward`), so DDP, FSDP2, DeepSpeed and PEFT wrappers
see a normal forward call: DDP's gradient hooks arm, FSDP2 unshards the head's parameters (a DTensor still sharded
is read with full_tensor()), PEFT's adapters apply. The head's weight is read without calling lm_head, so under
DeepSpeed ZeRO-3 it is gathered around the head (`sharding.gathered`) unless it is whole already. DeepSpeed 0.19
itself gathers a parameter read during a forward it hooks and registers it as an external parameter of the model:
the model's backward hooks gather it again (for a head whose backward reads it), and its gradient, computed in the
forward by HeadLoss or in the backward, reaches the parameter itself, which DeepSpeed reduces as any other. Where
DeepSpeed does not discover it (a forward outside its hooks' discovery), the head's own gather serves the call.
"""

import functools
import inspect
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.utils import ModelOutput

from posttrain._compat import module_load_balancing_loss
from posttrain.models.offloading import no_activation_offloading
from posttrain.models.sharding import full_tensor, gathered
from posttrain.ops import fused_linear_divergence, fused_linear_logprob, fused_linear_loss, selective_log_softmax
from posttrain.ops.fused_linear_logprob import STATS, requested_stats
from posttrain.ops.fused_linear_loss import DEFAULT_CHUNK_BYTES, LossChunk, row_chunks


@dataclass
class TokenLogprobOutput(ModelOutput):
    """What a patched model returns when called with `logprob_labels`.

    Every per-token field is [B, T - 1], aligned with labels[:, 1:] (the next-token targets), and 0 / False where that
    label is -100. logprobs and entropy are float32 and differentiable; mean_logit (mean over the vocabulary of the
    temperature-scaled logits), is_argmax (the label is the most likely token) and log_sum_sq_probs (log sum_v p_v^2)
    carry no gradient. aux_loss is the Mixture-of-Experts load-balancing loss (a differentiable scalar, as the model's
    own forward returns it) when router logits are requested from an MoE model, else None.

    With a `head_loss`, `loss` is its value (differentiable: the gradient flows through it alone) and the per-token
    fields carry no gradient. With a `head_divergence`, `loss` is the divergence summed over the label positions and
    `entropy` the model's entropy at the divergence's temperature (no gradient); the other fields are None.
    """

    logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    mean_logit: torch.Tensor | None = None
    is_argmax: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    loss: torch.Tensor | None = None


# The architectures whose forward rescales the logits by a config value: (attribute, multiplies?). An architecture not
# listed here that defines one of these attributes gets the full-logits path, with a warning.
_LOGIT_SCALING = {
    "cohere": ("logit_scale", True),
    "cohere2": ("logit_scale", True),
    "cohere2_moe": ("logit_scale", True),
    "falcon_h1": ("lm_head_multiplier", True),
    "granite": ("logits_scaling", False),
    "granitemoe": ("logits_scaling", False),
    "granitemoeshared": ("logits_scaling", False),
    "granitemoehybrid": ("logits_scaling", False),
    "granite_swa": ("logits_scaling", False),
    "granitemoe_swa": ("logits_scaling", False),
    "minicpm3": ("logits_scaling", False),
    "hyperclovax": ("logits_scaling", True),
}
_SCALING_ATTRIBUTES = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier")


def logit_scale(config) -> float | None:
    """The factor the model's forward multiplies its logits by (1.0 for most), or None when its config carries a
    scaling attribute whose convention posttrain does not know (the caller then falls back to the model's own logits).

    Cohere multiplies by logit_scale, Falcon-H1 by lm_head_multiplier, HyperCLOVA X by logits_scaling, while Granite
    and MiniCPM3 divide by logits_scaling.
    """
    rule = _LOGIT_SCALING.get(config.model_type)
    if rule is not None:
        value = getattr(config, rule[0], None)
        if value is None:
            return 1.0
        return float(value) if rule[1] else 1.0 / float(value)
    unknown = [name for name in _SCALING_ATTRIBUTES if getattr(config, name, None) not in (None, 1, 1.0)]
    return None if unknown else 1.0


def _scatter(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    # masked_scatter stays differentiable (and connected to the model) even when no label is valid
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


@dataclass
class HeadLoss:
    """A loss of the per-token log-probs that the patched forward computes itself: `model(..., logprob_labels=labels,
    head_loss=HeadLoss(loss_fn))`. With the fused kernels, `fused_linear_loss` computes it and its gradients during
    the forward (3 GEMMs, no [B, T, V] logits); otherwise loss_fn runs once on the plain log-probs.

    loss_fn(chunk: LossChunk) -> scalar tensor: the chunk's additive share of the loss (so its normalizers are the
    whole batch's, given up front). chunk.rows index the label positions (labels[:, 1:] != -100) in row-major order;
    `LabelLayout` maps them back to sequences.
    groups: [B, T - 1] integer ids aligned with labels[:, 1:]: positions with one id stay in one chunk (a sequence, a
        DPO pair); None lets any positions share a chunk (a token-separable loss such as SFT's).

    Example:
        >>> count = (labels[:, 1:] != -100).sum()
        >>> out = model(input_ids=ids, logprob_labels=labels, head_loss=HeadLoss(lambda c: -c.logprobs.sum() / count))
        >>> out.loss.backward()
    """

    loss_fn: Callable
    groups: torch.Tensor | None = None


@dataclass
class HeadDivergence:
    """A divergence from a teacher's next-token distributions that the patched forward computes on the model's last
    hidden states: `model(..., logprob_labels=labels, head_divergence=HeadDivergence(...))` runs
    `fused_linear_divergence` (reduction "sum") at the label positions (labels[:, 1:] != -100), inside the model's
    forward so that DDP, FSDP and PEFT see a normal call; the gradient reaches the model only.

    teacher_hidden: [B, T - 1, Ht], the teacher's last hidden states aligned with labels[:, 1:] (Ht may differ).
    teacher_head: the teacher's LM head (a Linear over the model's vocabulary).
    beta, temperature: as fused_linear_divergence's.
    student_scale, teacher_scale: the factor each model's forward multiplies its logits by (`logit_scale`).

    Example:
        >>> out = model(input_ids=ids, attention_mask=mask, logprob_labels=labels,
        ...             head_divergence=HeadDivergence(teacher_hidden, teacher.lm_head, beta=0.5))
        >>> (out.loss / (labels[:, 1:] != -100).sum()).backward()
    """

    teacher_hidden: torch.Tensor
    teacher_head: torch.nn.Module
    beta: float
    temperature: float = 1.0
    student_scale: float = 1.0
    teacher_scale: float = 1.0


class LabelLayout:
    """Where a head loss's chunk rows sit among the sequences of a batch.

    `mask` is the labels' mask (labels[:, 1:] != -100), [R, T - 1]. By default each row is a sequence and a position's
    column is its own; a packed batch (padding-free) gives each position's `sequence_ids` and `columns` instead
    (`packed_layout`), and `width` the longest sequence's number of positions.
    """

    def __init__(self, mask, sequence_ids=None, columns=None, width=None):
        self.mask_shape = mask.shape
        self.positions = mask.flatten().nonzero().squeeze(1)
        if sequence_ids is None:
            rows, self.width = mask.shape
            sequence_ids = torch.arange(rows, device=mask.device)[:, None].expand_as(mask)
            columns = torch.arange(self.width, device=mask.device).expand_as(mask)
        else:
            self.width = width
        self.sequence_ids = sequence_ids.flatten()[self.positions]
        self.columns = columns.flatten()[self.positions]

    def sequence_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The sequence each chunk row belongs to [n]."""
        return self.sequence_ids[rows]

    def dense(self, rows: torch.Tensor, *values, sequences: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each of `values` ([n] per chunk row, or None) placed in a zero [len(sequences), width] tensor, one row per
        entry of `sequences` (in that order; the chunk's rows must belong to them), keeping its gradient; then the
        [len(sequences), width] bool mask of the chunk's rows."""
        local = torch.full((int(self.sequence_ids.max()) + 1 if len(self.sequence_ids) else 1,), -1,
                           dtype=torch.long, device=rows.device)  # fmt: skip
        local[sequences] = torch.arange(len(sequences), device=rows.device)
        index = (local[self.sequence_ids[rows]], self.columns[rows])
        shape = (len(sequences), self.width)
        placed = [v.new_zeros(shape).index_put(index, v) if v is not None else None for v in values]
        mask = torch.zeros(shape, dtype=torch.bool, device=rows.device).index_put_(index, torch.tensor(True))
        return (*placed, mask)


def packed_layout(mask: torch.Tensor, sequence_lengths: torch.Tensor) -> LabelLayout:
    """The LabelLayout of one packed row ([1, L - 1] label mask) holding sequences of `sequence_lengths` back to back:
    each position belongs to the sequence it predicts a token of, at its column from that sequence's start."""
    starts = torch.cumsum(sequence_lengths, 0) - sequence_lengths
    position = torch.arange(mask.shape[1], device=mask.device)
    sequence_ids = (torch.searchsorted(starts, position, right=True) - 1).clamp(min=0)
    columns = position - starts[sequence_ids]
    width = max(int(sequence_lengths.max()) - 1, 1)
    return LabelLayout(mask, sequence_ids[None], columns[None], width)


@dataclass(eq=False)
class FusedHead:
    """The fused log-prob head installed on one model by `add_fused_logprob_head`; `remove()` takes it off.

    It lives on the model (as `model._posttrain_fused_head`), so a deep copy of a patched model carries its own.
    """

    model: torch.nn.Module = field(repr=False)
    temperature: float
    entropy: bool
    stats: bool | tuple[str, ...]
    fused: bool
    previous_forward: Callable | None  # an instance-level forward that was there before the patch

    def remove(self) -> None:
        """Restore the model's own forward. Wrappers that were put around the patched forward afterwards (accelerate's
        mixed-precision wrapper keeps it in `_original_forward`) go with it; accelerate adds them again when the model
        is prepared next."""
        model = self.model
        if getattr(model, FUSED_HEAD_ATTRIBUTE, None) is not self:
            raise RuntimeError(f"this fused head is not installed on {type(model).__name__} any more")
        model.__dict__.pop("_original_forward", None)
        if self.previous_forward is not None:
            model.forward = self.previous_forward
        else:
            model.__dict__.pop("forward", None)
        delattr(model, FUSED_HEAD_ATTRIBUTE)


FUSED_HEAD_ATTRIBUTE = "_posttrain_fused_head"


def fused_head_of(model: torch.nn.Module) -> FusedHead | None:
    """The FusedHead installed on `model`, or None."""
    return getattr(model, FUSED_HEAD_ATTRIBUTE, None)


def add_fused_logprob_head(
    model: torch.nn.Module,
    *,
    temperature: float = 1.0,
    entropy: bool = False,
    stats: bool | tuple[str, ...] = False,
    use_fused_kernels: bool = True,
    replace: bool = False,
) -> FusedHead:
    """Patch `model.forward` so that `model(input_ids, ..., logprob_labels=labels)` returns a `TokenLogprobOutput`.

    With use_fused_kernels, only the positions with a label != -100 go through `fused_linear_logprob` on the last
    hidden state and the LM head: no [B, T, V] logits. Without it (or for models that soft-cap their logits, rescale
    them in a way posttrain does not know, or whose LM head is not a plain linear layer), the original forward's logits
    go through the torch log-softmax: the same numbers, the plain way. Calls without `logprob_labels` (e.g. generate)
    run the original forward.

    Mixture-of-Experts models (a text config with `output_router_logits`): when router logits are requested (the
    call's `output_router_logits`, else the config's), `aux_loss` is the load-balancing loss the model's own forward
    would return: its modeling module's `load_balancing_loss_func` (Mixtral's if it has none) on the routers' logits,
    with the model's expert counts and the call's attention_mask.

    Args:
        model: a transformers causal LM (before PEFT wrapping or after; patch the underlying model).
        temperature: the logits are divided by it (GRPO's sampling temperature).
        entropy: also return the per-token entropy (differentiable).
        stats: also return per-token statistics: True for mean_logit, is_argmax and log_sum_sq_probs (logits/*,
            token accuracy, WPO weights), or the names of those wanted (each costs a little in the kernel).
        replace: a model that already has a fused head gets this one instead (a trainer taking over a model that
            another trainer patched); otherwise that is an error.

    Returns:
        the FusedHead; its `remove()` restores the model's own forward.

    Example:
        >>> head = add_fused_logprob_head(model, entropy=True)
        >>> out = model(input_ids=ids, attention_mask=mask, logprob_labels=labels, output_router_logits=True)
        >>> loss = -out.logprobs.sum() / out.label_mask.sum() + 0.001 * out.aux_loss  # aux_loss: MoE models only
        >>> head.remove()
    """
    installed = fused_head_of(model)
    if installed is not None:
        if not replace:
            raise ValueError(
                f"{type(model).__name__} already has a fused log-prob head: call .remove() on the FusedHead that "
                "add_fused_logprob_head returned (or pass replace=True) before adding another"
            )
        installed.remove()
    config = model.config.get_text_config()
    is_moe = hasattr(config, "output_router_logits")
    load_balancing_loss = _load_balancing_loss(model, config) if is_moe else None
    scale = logit_scale(config)
    reason = _needs_full_logits(model, config, is_moe and load_balancing_loss is None, scale is None)
    fused = use_fused_kernels and reason is None
    if use_fused_kernels and reason is not None:
        warnings.warn(f"{reason}, so this model's log-probs come from its full logits (more memory)", stacklevel=2)
    head = FusedHead(model, temperature, entropy, stats, fused, model.__dict__.get("forward"))
    forward = _patched_forward(type(model), config, is_moe, load_balancing_loss, temperature / (scale or 1.0))
    setattr(model, FUSED_HEAD_ATTRIBUTE, head)
    model.forward = types.MethodType(forward, model)
    return head


def _patched_forward(model_class, config, is_moe, load_balancing_loss, effective_temperature):
    signature = inspect.signature(model_class.forward)

    @functools.wraps(model_class.forward)  # generate validates its kwargs against the original signature
    def forward(self, *args, logprob_labels=None, head_loss=None, head_divergence=None, **kwargs):
        # read from the model, not closed over: a deep copy of the model runs on its own modules
        head = fused_head_of(self)
        original = head.previous_forward or functools.partial(model_class.forward, self)
        if logprob_labels is None:
            return original(*args, **kwargs)
        _check_inputs(self, signature.bind(self, *args, **kwargs).arguments.get("input_ids"), logprob_labels)
        kwargs["use_cache"] = False
        if getattr(config, "output_router_logits", False):  # read per call: trainers set it after patching
            kwargs.setdefault("output_router_logits", True)
        labels = logprob_labels[:, 1:]
        if head_divergence is not None:
            hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
            heads = (self.get_output_embeddings(), head_divergence.teacher_head)
            with no_activation_offloading(), gathered(*(p for h in heads for p in (h.weight, h.bias))):
                return _divergence_outputs(hidden, *heads, labels, head_divergence, "auto" if head.fused else "torch")
        if not head.fused:
            full = original(*args, **kwargs)
            out = _plain_outputs(full.logits[:, :-1], labels, head.temperature, head.entropy, head.stats)
            out.aux_loss = getattr(full, "aux_loss", None)
            return out if head_loss is None else _with_plain_loss(out, head_loss)
        backbone = self.base_model(*args, **kwargs)
        hidden = backbone.last_hidden_state[:, :-1]
        outputs = _fused_outputs if head_loss is None else functools.partial(_fused_loss_outputs, head_loss=head_loss)
        # what the head saves for backward (its input, or the loss's dH and dW) is needed first: offloading it saves
        # nothing and would copy the gathered head weight out and back every step
        lm_head = self.get_output_embeddings()
        with no_activation_offloading(), gathered(lm_head.weight, lm_head.bias):
            out = outputs(hidden, lm_head, labels, effective_temperature, head.entropy, head.stats)
        if is_moe and kwargs.get("output_router_logits"):
            attention_mask = signature.bind(self, *args, **kwargs).arguments.get("attention_mask")
            out.aux_loss = load_balancing_loss(backbone.router_logits, attention_mask)
        return out

    return forward


def divergence_unsupported(model) -> str | None:
    """Why a head divergence cannot reproduce `model`'s own logits from its last hidden states (soft-capped logits,
    an unknown rescaling, an LM head that is not a plain linear layer), or None."""
    config = model.config.get_text_config()
    return _needs_full_logits(model, config, False, logit_scale(config) is None)


def _check_inputs(model, input_ids, labels) -> None:
    """Clear errors for what would otherwise fail inside the model (on CUDA, an out-of-range token id is a device-side
    assert that ends the process): labels shaped unlike input_ids, token ids outside the embedding."""
    if input_ids is None:
        return
    if labels.shape != input_ids.shape:
        raise ValueError(
            f"logprob_labels has shape {tuple(labels.shape)}, expected {tuple(input_ids.shape)} (that of input_ids)"
        )
    vocab = model.get_input_embeddings().num_embeddings
    outside = (input_ids < 0) | (input_ids >= vocab)
    if outside.any():
        raise ValueError(
            f"input_ids holds token id {int(input_ids[outside][0])}, outside the model's vocabulary [0, {vocab}): "
            "tokenize with the model's own tokenizer, or resize its embeddings (model.resize_token_embeddings)"
        )


def _needs_full_logits(model, config, unknown_load_balancing: bool, unknown_scaling: bool) -> str | None:
    """Why the fused path cannot reproduce this model's forward, or None."""
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is not None:
        return f"final_logit_softcapping={softcap}: the fused log-prob kernel does not soft-cap"
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        return f"{type(model).__name__}'s LM head ({type(head).__name__}) is not a plain linear layer"
    if unknown_scaling:
        attributes = [name for name in _SCALING_ATTRIBUTES if getattr(config, name, None) is not None]
        return f"{type(model).__name__} rescales its logits ({', '.join(attributes)}) by a convention posttrain does not know"
    if unknown_load_balancing:
        return (
            f"{type(model).__name__}'s MoE load-balancing loss takes other arguments than (num_experts, top_k, "
            "attention_mask), or its expert counts are not found: only its own forward computes it"
        )
    return None


def _load_balancing_loss(model, config) -> Callable | None:
    """`(router_logits, attention_mask) -> aux_loss` as the MoE model's own forward computes it, or None when its
    loss function takes other arguments than Mixtral's or its expert counts are not found on the model or config."""
    func = module_load_balancing_loss(model)
    # The causal LMs pass their own attributes (set from the config at init); VLM wrappers read the text config
    num_experts = _first_attribute((model, config), ("num_experts", "num_local_experts"))
    top_k = _first_attribute((model, config), ("num_experts_per_tok",))
    if num_experts is None or top_k is None:
        return None
    if list(inspect.signature(func).parameters)[1:] != ["num_experts", "top_k", "attention_mask"]:
        return None
    return lambda router_logits, attention_mask: func(router_logits, num_experts, top_k, attention_mask)


def _first_attribute(objects, names):
    return next((getattr(o, n) for o in objects for n in names if getattr(o, n, None) is not None), None)


def _fused_outputs(hidden, head, labels, temperature, entropy, stats) -> TokenLogprobOutput:
    # With device_map, the backbone may end on another device than the head
    hidden, labels = hidden.to(head.weight.device), labels.to(head.weight.device)
    mask = labels != -100
    result = fused_linear_logprob(
        hidden[mask], full_tensor(head.weight), labels[mask], bias=full_tensor(head.bias), temperature=temperature,
        return_entropy=entropy, return_stats=stats,
    )  # fmt: skip
    if stats:
        logprobs, ent, *extra = result
    else:
        (logprobs, ent), extra = (result if entropy else (result, None)), ()
    out = TokenLogprobOutput(
        logprobs=_scatter(mask, logprobs), entropy=_scatter(mask, ent) if ent is not None else None, label_mask=mask
    )
    for name, values in zip(STATS, extra):
        if values is not None:
            setattr(out, name, _scatter(mask, values))
    return out


def _fused_loss_outputs(hidden, head, labels, temperature, entropy, stats, head_loss: HeadLoss) -> TokenLogprobOutput:
    hidden, labels = hidden.to(head.weight.device), labels.to(head.weight.device)
    mask = labels != -100
    flat_hidden = hidden[mask]
    chunks = None
    if head_loss.groups is not None:
        max_rows = max(1, DEFAULT_CHUNK_BYTES // (head.weight.shape[0] * flat_hidden.element_size()))
        chunks = row_chunks(head_loss.groups.to(mask.device)[mask], max_rows)
    result = fused_linear_loss(
        flat_hidden, full_tensor(head.weight), labels[mask], head_loss.loss_fn, chunks=chunks, bias=full_tensor(head.bias),
        temperature=temperature, with_entropy=entropy, stats=requested_stats(stats),
    )  # fmt: skip
    out = TokenLogprobOutput(loss=result.loss, label_mask=mask)
    for name in ("logprobs", "entropy", *STATS):
        values = getattr(result, name)
        if values is not None:
            setattr(out, name, _scatter(mask, values))
    return out


def _divergence_outputs(hidden, head, teacher_head, labels, divergence: HeadDivergence, impl) -> TokenLogprobOutput:
    hidden, labels = hidden.to(head.weight.device), labels.to(head.weight.device)
    mask = labels != -100
    s_scale, t_scale = divergence.student_scale, divergence.teacher_scale
    # a forward that multiplies its logits by s gives s (h W^T + b) = (s h) W^T + s b: scale the inputs, not the op
    result = fused_linear_divergence(
        _times(hidden[mask], s_scale), full_tensor(head.weight),
        _times(divergence.teacher_hidden.to(hidden.device)[mask], t_scale), full_tensor(teacher_head.weight), None,
        beta=divergence.beta, temperature=divergence.temperature, student_bias=_times(full_tensor(head.bias), s_scale),
        teacher_bias=_times(full_tensor(teacher_head.bias), t_scale), reduction="sum", impl=impl,
    )  # fmt: skip
    return TokenLogprobOutput(loss=result.loss, entropy=_scatter(mask, result.entropy), label_mask=mask)


def _times(tensor: torch.Tensor | None, scale: float) -> torch.Tensor | None:
    return tensor if tensor is None or scale == 1.0 else tensor * scale


def _with_plain_loss(out: TokenLogprobOutput, head_loss: HeadLoss) -> TokenLogprobOutput:
    # the whole batch is one chunk: the loss goes through the plain log-probs' autograd graph
    mask = out.label_mask
    fields = {name: getattr(out, name) for name in ("logprobs", "entropy", *STATS)}
    chunk = LossChunk(
        rows=torch.arange(int(mask.sum()), device=mask.device),
        **{name: value[mask] if value is not None else None for name, value in fields.items()},
    )
    out.loss = head_loss.loss_fn(chunk)
    for name, value in fields.items():
        if value is not None:
            setattr(out, name, value.detach())
    return out


def _plain_outputs(logits, labels, temperature, entropy, stats) -> TokenLogprobOutput:
    mask = labels != -100
    result = selective_log_softmax(logits, labels, temperature=temperature, return_entropy=entropy, impl="torch")
    logprobs, ent = result if entropy else (result, None)
    out = TokenLogprobOutput(logprobs=logprobs, entropy=ent, label_mask=mask)
    wanted = requested_stats(stats)
    with torch.no_grad():
        z = logits.float() / temperature
        if "mean_logit" in wanted:
            out.mean_logit = torch.where(mask, z.mean(-1), 0.0)
        if "is_argmax" in wanted:
            out.is_argmax = (logits.argmax(-1) == labels) & mask
        if "log_sum_sq_probs" in wanted:
            out.log_sum_sq_probs = torch.where(mask, torch.logsumexp(2.0 * z, -1) - 2.0 * torch.logsumexp(z, -1), 0.0)
    return out
