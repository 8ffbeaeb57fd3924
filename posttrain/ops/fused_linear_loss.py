"""A loss of per-token log-probs (and entropy) straight from hidden states and the LM head, with its gradients computed
during the forward: three GEMMs (logits, dH, dW) instead of the four of a log-prob op whose backward recomputes the
logits, and never more than one row chunk's [n, V] buffer."""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from ._common import resolve_impl, triton_usable
from .fused_linear_logprob import STATS, _autocast, _check_inputs

# Bound on one chunk's [n, V] buffer when `chunks` is None
DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024


class LossChunk(NamedTuple):
    """What `loss_fn` receives: one chunk of rows, each field [n] in the chunk's row order.

    rows: int64 indices into the N rows. logprobs: float32 (float64 for float64 inputs) log p(target), requiring grad
    when the loss is differentiated (0 for ignore_index rows). entropy: likewise, or None without with_entropy.
    mean_logit (float32), is_argmax (bool), log_sum_sq_probs (float32): the statistics asked for in `stats` (no
    gradient), else None.
    """

    rows: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    mean_logit: torch.Tensor | None
    is_argmax: torch.Tensor | None
    log_sum_sq_probs: torch.Tensor | None


class FusedLoss(NamedTuple):
    """What `fused_linear_loss` returns. loss: float32 scalar (float64 for float64 inputs), differentiable w.r.t.
    hidden, weight and bias. The other fields are detached [N] tensors (float32 / float64; is_argmax bool), None where
    not asked for."""

    loss: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    mean_logit: torch.Tensor | None
    is_argmax: torch.Tensor | None
    log_sum_sq_probs: torch.Tensor | None


class _Plan(NamedTuple):
    loss_fn: Callable[[LossChunk], torch.Tensor]
    chunks: list  # of slices (contiguous blocks) or int64 index tensors
    temperature: float
    ignore_index: int
    with_entropy: bool
    stats: tuple[str, ...]
    impl: str


def row_chunks(group_ids: torch.Tensor, max_rows: int) -> list[torch.Tensor]:
    """Pack whole groups of rows (sequences, pairs) into chunks of at most `max_rows` rows for `fused_linear_loss`.

    Args:
        group_ids: [N] integer group of each row. The rows of one group always share a chunk; groups are packed in
            increasing id order (for nondecreasing ids the chunks are consecutive row ranges).
        max_rows: >= 1. A group larger than max_rows gets a chunk of its own.

    Returns:
        A list of int64 index tensors on group_ids' device, partitioning range(N).

    Example:
        >>> row_chunks(torch.tensor([0, 0, 1, 1, 1, 2]), max_rows=4)
        [tensor([0, 1]), tensor([2, 3, 4, 5])]
    """
    if not isinstance(group_ids, torch.Tensor) or group_ids.dim() != 1 or group_ids.is_floating_point():
        raise TypeError(f"group_ids must be a 1-D integer tensor, got {_describe(group_ids)}")
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be an int >= 1, got {max_rows!r}")
    if group_ids.numel() == 0:
        return []
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    sizes, size = [], 0
    for count in counts.tolist():
        if size and size + count > max_rows:
            sizes.append(size)
            size = 0
        size += count
    sizes.append(size)
    return list(torch.split(order, sizes))


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _check_chunks(chunks, n: int, device: torch.device) -> list[torch.Tensor]:
    if isinstance(chunks, torch.Tensor) or not isinstance(chunks, (list, tuple)):
        raise TypeError(f"chunks must be a list of 1-D int64 tensors of row indices, got {_describe(chunks)}")
    for i, rows in enumerate(chunks):
        if not isinstance(rows, torch.Tensor) or rows.dim() != 1 or rows.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"chunks[{i}] must be a 1-D int64 tensor of row indices, got {_describe(rows)}")
        if rows.device != device:
            raise ValueError(f"chunks[{i}] is on {rows.device}, hidden on {device}")
        if rows.numel() == 0:
            raise ValueError(f"chunks[{i}] is empty; every chunk needs at least one row")
    total = sum(rows.numel() for rows in chunks)
    if total != n:
        raise ValueError(f"chunks must partition the {n} rows of hidden, but their sizes sum to {total}")
    if n == 0:
        return []
    every = torch.cat(list(chunks)).long()
    in_range = (every >= 0) & (every < n)
    seen = torch.zeros(n, dtype=torch.int32, device=device).index_add_(
        0, every.clamp(0, n - 1), in_range.to(torch.int32)
    )
    if not bool(in_range.all() & (seen == 1).all()):  # the one host sync of the check
        _raise_partition_error(chunks, n, seen)
    return [rows.long() for rows in chunks]


def _raise_partition_error(chunks, n: int, seen: torch.Tensor):
    for i, rows in enumerate(chunks):
        outside = (rows < 0) | (rows >= n)
        if bool(outside.any()):
            raise ValueError(f"chunks[{i}] holds row {rows[outside][0].item()}, outside [0, {n})")
    repeated = (seen > 1).nonzero()[0].item()
    missing = (seen == 0).nonzero()[0].item()
    raise ValueError(f"chunks must partition range({n}): row {repeated} appears more than once, row {missing} in none")


def _contiguous_chunks(n: int, vocab: int, itemsize: int, max_chunk_bytes: int) -> list[slice]:
    rows = max(1, max_chunk_bytes // (vocab * itemsize))
    return [slice(start, min(start + rows, n)) for start in range(0, n, rows)]


def _take(tensor: torch.Tensor, rows) -> torch.Tensor:
    return tensor[rows] if isinstance(rows, slice) else tensor.index_select(0, rows)


def _put(dst: torch.Tensor, rows, src: torch.Tensor) -> None:
    if isinstance(rows, slice):
        dst[rows] = src
    else:
        dst.index_copy_(0, rows, src)


def _row_indices(rows, device) -> torch.Tensor:
    return torch.arange(rows.start, rows.stop, device=device) if isinstance(rows, slice) else rows


def _matmul(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b, accumulated in at least float32 and rounded once to out_dtype."""
    if a.dtype == b.dtype == out_dtype:
        return a @ b
    if a.device.type == "cuda" and a.dtype == b.dtype and out_dtype == torch.float32:
        return torch.mm(a, b, out_dtype=torch.float32)
    wide = torch.promote_types(torch.promote_types(a.dtype, b.dtype), out_dtype)
    return (a.to(wide) @ b.to(wide)).to(out_dtype)


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b for a float32 (or float64) acc, without rounding a @ b to a's lower precision first."""
    if a.dtype == b.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.device.type == "cuda" and a.dtype == b.dtype and acc.dtype == torch.float32:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class _Grads:
    """dH, dW, dbias built chunk by chunk, returned in `dtypes`: each dH row is written once (a row is in one chunk);
    dW and dbias are summed over chunks in float32 (float64 for float64 inputs), or with a single chunk computed
    straight into their dtype by one GEMM (rounded once either way)."""

    def __init__(self, hidden, weight, dtypes, needs, num_chunks):
        self.dtypes, self.needs = dtypes, needs
        self.single = num_chunks == 1
        self.wide = torch.promote_types(weight.dtype, torch.float32)
        self.weight_shape, self.device = weight.shape, weight.device
        self.dh = torch.zeros(hidden.shape, device=hidden.device, dtype=dtypes[0]) if needs[0] else None
        self.dw = self.db = None

    def add(self, rows, dlogits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor) -> None:
        _, needs_w, needs_b = self.needs
        if self.dh is not None:
            _put(self.dh, rows, _matmul(dlogits, weight, self.dh.dtype))
        if needs_w and self.single:
            self.dw = _matmul(dlogits.t(), hidden, self.dtypes[1])
        elif needs_w:
            self.dw = self.dw if self.dw is not None else self._zeros(self.weight_shape)
            _accumulate_mm(self.dw, dlogits.t(), hidden)
        if needs_b:
            self.db = self.db if self.db is not None else self._zeros(self.weight_shape[:1])
            self.db += dlogits.sum(dim=0, dtype=self.wide)

    def _zeros(self, shape) -> torch.Tensor:
        return torch.zeros(shape, device=self.device, dtype=self.wide)

    def result(self) -> tuple:
        grads = (self.dh, self.dw, self.db)
        shapes = (None, self.weight_shape, self.weight_shape[:1])
        return tuple(
            None if not need else (g if g is not None else self._zeros(shape)).to(dtype)
            for need, g, shape, dtype in zip(self.needs, grads, shapes, self.dtypes)
        )


def _torch_forward(hidden, weight, bias, targets, plan: _Plan):
    # The torch path: logits in float32 math (float64 for float64 inputs), kept for the analytic logits gradient.
    wide = torch.promote_types(hidden.dtype, torch.float32)
    z = _matmul(hidden, weight.t(), wide)
    if bias is not None:
        z += bias.to(wide)
    z = z / plan.temperature
    valid = targets != plan.ignore_index
    safe_targets = targets.masked_fill(~valid, 0)
    log_p = z.log_softmax(dim=-1)
    p = log_p.exp()
    out = {"logprob": torch.where(valid, log_p.gather(-1, safe_targets[:, None]).squeeze(-1), 0.0)}
    if plan.with_entropy:
        out["entropy"] = torch.where(valid, -(p * log_p).sum(-1), 0.0)
    if "mean_logit" in plan.stats:
        out["mean_logit"] = torch.where(valid, z.mean(-1), 0.0)
    if "is_argmax" in plan.stats:
        out["is_argmax"] = (z.argmax(-1) == targets) & valid
    if "log_sum_sq_probs" in plan.stats:
        out["log_sum_sq_probs"] = torch.where(valid, torch.logsumexp(2.0 * log_p, -1), 0.0)
    return out, (log_p, p, valid, safe_targets, out.get("entropy"))


def _torch_dlogits(state, grad_logprob, grad_entropy, temperature: float) -> torch.Tensor:
    # d(loss)/dz_v = g_lp ([v == t] - p_v) - g_ent p_v (log p_v + entropy), then through z / T
    log_p, p, valid, safe_targets, entropy = state
    if grad_logprob is not None:
        g = torch.where(valid, grad_logprob.to(p.dtype), 0.0)
        dlogits = p * -g[:, None]
        dlogits.scatter_add_(1, safe_targets[:, None], g[:, None])
    else:
        dlogits = torch.zeros_like(p)
    if grad_entropy is not None:
        g = torch.where(valid, grad_entropy.to(p.dtype), 0.0)
        dlogits -= (log_p + entropy[:, None]).mul_(p).mul_(g[:, None])
    return dlogits.div_(temperature)


def _evaluate(plan: _Plan, rows: torch.Tensor, out: dict, track: bool, like: torch.Tensor):
    """Call loss_fn on one chunk: its value (in `like`'s dtype, on its device), d(value)/d(logprobs) and
    d(value)/d(entropy) (each None when the value does not depend on it, or when not `track`ing)."""
    logprobs = out["logprob"].detach().requires_grad_(track)
    entropy = out["entropy"].detach().requires_grad_(track) if plan.with_entropy else None
    chunk = LossChunk(rows, logprobs, entropy, *(out.get(name) for name in STATS))
    with torch.enable_grad() if track else torch.no_grad():
        value = plan.loss_fn(chunk)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = torch.tensor(float(value))
    if not isinstance(value, torch.Tensor) or value.dim() != 0 or not value.is_floating_point():
        raise TypeError(
            f"loss_fn must return a floating-point scalar (0-dim) tensor, its chunk's contribution to the loss; got "
            f"{_describe(value)}"
        )
    result = value.detach().to(like)
    if not (track and value.requires_grad):
        return result, None, None
    inputs = (logprobs, entropy) if entropy is not None else (logprobs,)
    grads = torch.autograd.grad(value, inputs, allow_unused=True)
    grads = [g.to(like.dtype).contiguous() if g is not None else None for g in grads]
    return result, grads[0], grads[1] if len(grads) > 1 else None


def _run(hidden, weight, bias, targets, plan: _Plan, needs: tuple[bool, bool, bool]):
    """The loss, the [N] outputs by name, and (dH, dW, dbias) for grad_output = 1 (None where not needed)."""
    dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
    hidden, weight, bias = _autocast(hidden, weight, bias)
    targets = targets.long().contiguous()
    device, n = hidden.device, hidden.shape[0]
    # float32 values (float64 for float64 inputs, which only the torch path takes)
    values = {"device": device, "dtype": torch.promote_types(hidden.dtype, torch.float32)}
    track = any(needs)
    outputs = {"logprob": torch.zeros(n, **values)}
    if plan.with_entropy:
        outputs["entropy"] = torch.zeros(n, **values)
    for name in plan.stats:
        outputs[name] = (
            torch.zeros(n, device=device, dtype=torch.bool) if name == "is_argmax" else torch.zeros(n, **values)
        )
    grads = _Grads(hidden, weight, dtypes, needs, len(plan.chunks)) if track else None
    loss = torch.zeros((), **values)
    buffer = None
    if plan.impl == "triton" and plan.chunks:
        from posttrain.kernels.fused_linear_loss import exp_buffer

        buffer = exp_buffer(max(_size(rows) for rows in plan.chunks), weight.shape[0], hidden)
    # Autocast is off inside: the GEMMs run in the dtype chosen above, and loss_fn sees the float32 values as they are.
    with torch.autocast(device.type, enabled=False):
        for rows in plan.chunks:
            h, t = _take(hidden, rows), _take(targets, rows)
            value, dlogits = _chunk(plan, rows, h, weight, bias, t, buffer, outputs, track, loss)
            loss += value
            if dlogits is not None:
                grads.add(rows, dlogits, h, weight)
    return loss, outputs, grads.result() if track else (None, None, None)


def _size(rows) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else rows.numel()


def _chunk(plan: _Plan, rows, h, weight, bias, targets, buffer, outputs: dict, track: bool, like: torch.Tensor):
    """One chunk: its outputs go into `outputs`; returns its loss value and its logits gradient (None if none)."""
    if plan.impl == "triton":
        from posttrain.kernels.fused_linear_loss import fused_linear_loss_dlogits, fused_linear_loss_fwd

        out = fused_linear_loss_fwd(h, weight, bias, targets, buffer, plan.temperature, plan.ignore_index,
                                    plan.with_entropy, plan.stats)  # fmt: skip
    else:
        out, state = _torch_forward(h, weight, bias, targets, plan)
    for name, dst in outputs.items():
        _put(dst, rows, out[name])
    value, grad_logprob, grad_entropy = _evaluate(plan, _row_indices(rows, h.device), out, track, like)
    if grad_logprob is None and grad_entropy is None:
        return value, None
    if plan.impl == "triton":
        dlogits = fused_linear_loss_dlogits(buffer, out, targets, grad_logprob, grad_entropy, plan.temperature,
                                            plan.ignore_index)  # fmt: skip
    else:
        dlogits = _torch_dlogits(state, grad_logprob, grad_entropy, plan.temperature)
    return value, dlogits


def _scaled(grad: torch.Tensor | None, factor: torch.Tensor) -> torch.Tensor | None:
    if grad is None:
        return None
    if grad.dtype in (torch.float32, torch.float64):
        return grad * factor.to(grad.dtype)
    factor = factor.float()
    if triton_usable(grad.device):
        from posttrain.kernels.fused_linear_loss import scale

        return scale(grad, factor)
    return (grad.float() * factor).to(grad.dtype)


class FusedLinearLossFunction(torch.autograd.Function):
    """forward(hidden, weight, bias, targets, plan) runs every chunk (kernels or torch per plan.impl), calls loss_fn,
    and keeps dH, dW, dbias for grad_output = 1; backward only scales them by grad_output. Returns (loss, logprobs,
    entropy, mean_logit, is_argmax, log_sum_sq_probs); only loss is differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, plan):
        loss, outputs, grads = _run(hidden, weight, bias, targets, plan, tuple(ctx.needs_input_grad[:3]))
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(*outputs.values())
        return loss, *_fields(outputs)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        return (*(_scaled(g, grad_loss) for g in ctx.saved_tensors), None, None)


def _fields(outputs: dict) -> tuple:
    return (outputs["logprob"], outputs.get("entropy"), *(outputs.get(name) for name in STATS))


def _apply(hidden, weight, targets, loss_fn, chunks, bias, temperature, ignore_index, with_entropy, stats,
           max_chunk_bytes, impl) -> FusedLoss:  # fmt: skip
    n = hidden.shape[0]
    if chunks is None:
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        # the kernels' buffer is in the GEMM dtype; the torch path's temporaries are float32 (float64)
        itemsize = dtype.itemsize if impl == "triton" else torch.promote_types(dtype, torch.float32).itemsize
        chunks = _contiguous_chunks(n, weight.shape[0], itemsize, max_chunk_bytes)
    else:
        chunks = _check_chunks(chunks, n, hidden.device)
    plan = _Plan(loss_fn, chunks, float(temperature), int(ignore_index), bool(with_entropy), tuple(stats), impl)
    leaves = (hidden, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in leaves):
        return FusedLoss(*FusedLinearLossFunction.apply(hidden, weight, bias, targets, plan))
    loss, outputs, _ = _run(hidden, weight, bias, targets, plan, (False, False, False))
    return FusedLoss(loss, *_fields(outputs))


def fused_linear_loss_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[LossChunk], torch.Tensor],
    *,
    chunks: Sequence[torch.Tensor] | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = False,
    stats: tuple[str, ...] = (),
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> FusedLoss:
    """The plain-PyTorch path of `fused_linear_loss` (same arguments and result): the CPU fallback and the benchmark
    baseline. Per chunk: float32 logits (float64 for float64 inputs), log-softmax, loss_fn, the logits gradient built
    analytically, then dH and dW by two matmuls. Without `chunks`, each chunk's float32 [n, V] temporaries stay within
    max_chunk_bytes apiece (a few of them live at once)."""
    return _apply(hidden, weight, targets, loss_fn, chunks, bias, temperature, ignore_index, with_entropy,
                  _check_stats(stats), max_chunk_bytes, "torch")  # fmt: skip


def _check_stats(stats) -> tuple[str, ...]:
    if isinstance(stats, str) or not isinstance(stats, (tuple, list)) or any(s not in STATS for s in stats):
        raise ValueError(f"stats {stats!r} must be a tuple of names among: {', '.join(STATS)}")
    return tuple(name for name in STATS if name in stats)


def _check_arguments(hidden, weight, targets, loss_fn, bias, temperature, ignore_index, max_chunk_bytes):
    _check_inputs(hidden, weight, targets, bias, temperature, ignore_index)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, H], got shape {tuple(hidden.shape)}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (LossChunk -> scalar tensor), got {type(loss_fn).__name__}")
    if isinstance(max_chunk_bytes, bool) or not isinstance(max_chunk_bytes, int) or max_chunk_bytes < 1:
        raise ValueError(f"max_chunk_bytes must be a positive int, got {max_chunk_bytes!r}")


def fused_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[LossChunk], torch.Tensor],
    *,
    chunks: Sequence[torch.Tensor] | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = False,
    stats: tuple[str, ...] = (),
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    impl: str = "auto",
) -> FusedLoss:
    """A scalar loss of the per-token log-probs under softmax((hidden @ weight.T + bias) / temperature), with dH, dW
    and dbias computed in the forward (3 GEMMs per chunk) and only scaled by the incoming gradient in backward.

    The rows are processed chunk by chunk. For each chunk the op computes log p(target) (and entropy, and the asked-for
    statistics), calls `loss_fn(chunk)` for the chunk's additive contribution to the loss, takes that contribution's
    gradient w.r.t. the chunk's logprobs / entropy with torch.autograd.grad, and turns it into the logits gradient and
    then dH and dW. loss_fn therefore sees whole chunks only: pass `chunks` so each holds whole sequences (or pairs)
    when the loss mixes rows, and give it any normalizer (token count, number of sequences) up front. Tensors loss_fn
    captures from outside are constants here: gradient reaches hidden, weight and bias only.

    Args:
        hidden: [N, H] float32 / bfloat16 / float16 (float64 with impl="torch"), e.g. the last hidden states of the
            tokens that have a label.
        weight: [V, H], the LM head's weight, same dtype as hidden (or both cast by an active autocast).
        targets: [N] int64 token ids in [0, V), or ignore_index (such rows get logprob 0 and no gradient).
        loss_fn: LossChunk -> 0-dim floating tensor. Runs with autocast off and (when the loss is differentiated)
            grad enabled; called once per chunk, in order.
        chunks: a list of int64 row-index tensors partitioning range(N) (see `row_chunks`); None: consecutive blocks
            of rows whose [n, V] buffer fits in max_chunk_bytes.
        bias: optional [V].
        temperature: > 0; logits are divided by it before the softmax.
        ignore_index: target value of rows to skip.
        with_entropy: give loss_fn (and return) the float32 entropy of each row's distribution (differentiable).
        stats: names among "mean_logit", "is_argmax", "log_sum_sq_probs": per-row statistics without gradient.
        max_chunk_bytes: bound on one chunk's [n, V] buffer when chunks is None.
        impl: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else torch), "triton" or "torch".

    Returns:
        FusedLoss: the float32 scalar loss (sum of the chunks' contributions; differentiable w.r.t. hidden, weight
        and bias, whose gradients come back in their own dtypes), and detached [N] logprobs, entropy and statistics
        (None where not asked for). With grad disabled, or nothing requiring grad, no gradient is computed.

        Until backward the op holds dH [N, H], dW [V, H] and dbias in the inputs' dtypes (accumulated in float32,
        rounded once), not hidden or weight; backward multiplies them by grad_output in float32 and rounds again.

    Example:
        >>> hidden = torch.randn(6, 64, requires_grad=True)          # [N, H]
        >>> lm_head = torch.nn.Linear(64, 1000, bias=False)
        >>> labels = torch.randint(0, 1000, (6,))
        >>> nll = lambda chunk: -chunk.logprobs.sum() / 6            # mean NLL over the 6 tokens
        >>> out = fused_linear_loss(hidden, lm_head.weight, labels, nll)
        >>> out.loss.backward()                                      # hidden.grad, lm_head.weight.grad
        >>> pairs = row_chunks(torch.tensor([0, 0, 0, 1, 1, 1]), max_rows=3)   # one sequence per chunk
        >>> fused_linear_loss(hidden, lm_head.weight, labels, nll, chunks=pairs).logprobs.shape
        torch.Size([6])
    """
    _check_arguments(hidden, weight, targets, loss_fn, bias, temperature, ignore_index, max_chunk_bytes)
    stats = _check_stats(stats)
    impl = "torch" if hidden.dtype == torch.float64 and impl == "auto" else impl
    impl = resolve_impl(impl, hidden.device)
    if impl == "triton" and hidden.dtype == torch.float64:
        raise TypeError("impl='triton' supports float32, bfloat16 and float16; hidden is float64 (use impl='torch')")
    return _apply(hidden, weight, targets, loss_fn, chunks, bias, temperature, ignore_index, with_entropy, stats,
                  max_chunk_bytes, impl)  # fmt: skip
