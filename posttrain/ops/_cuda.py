"""posttrain's optional CUDA extension (csrc/): loading it, and its fake and autograd registrations.

The extension is built by `POSTTRAIN_BUILD_CUDA=1 pip install --no-build-isolation -e .` (automatically where CUDA
PyTorch and nvcc are present), or just-in-time from a checkout with POSTTRAIN_JIT_CUDA=1. Without it, impl="auto" uses
the Triton kernels and nothing is printed.
"""

import functools
import importlib
import os
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
BUILD_HINT = (
    "posttrain's CUDA extension is not available: build it with `POSTTRAIN_BUILD_CUDA=1 pip install "
    "--no-build-isolation -e .` or set POSTTRAIN_JIT_CUDA=1 in a checkout (needs CUDA PyTorch and nvcc)"
)


def jit_build(verbose: bool = False) -> None:
    """Compile csrc/ with torch.utils.cpp_extension.load and load it (registers the posttrain:: ops)."""
    from torch.utils.cpp_extension import load

    sources = sorted(str(p) for p in CSRC.glob("*.cu")) + [str(CSRC / "bindings.cpp")]
    load(name="posttrain_C", sources=sources, extra_include_paths=[str(CSRC)], extra_cuda_cflags=["-O3"],
         is_python_module=False, verbose=verbose)  # fmt: skip


@functools.cache
def cuda_ops_available() -> bool:
    """Whether the posttrain:: CUDA ops are registered (loading the extension on first call)."""
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module("posttrain._C")
    except ImportError:
        if os.environ.get("POSTTRAIN_JIT_CUDA") != "1" or not CSRC.is_dir():
            return False
        jit_build()
    _register_fake_and_autograd()
    _register_grpo_fakes()
    return True


def _register_fake_and_autograd() -> None:
    ops = torch.ops.posttrain

    @torch.library.register_fake("posttrain::selective_log_softmax_fwd")
    def _(logits, targets, temperature, ignore_index, with_entropy):
        n = logits.shape[0]
        f32 = dict(dtype=torch.float32, device=logits.device)
        return logits.new_empty(n, **f32), logits.new_empty(n if with_entropy else 0, **f32), logits.new_empty(
            (2, n), **f32
        )

    @torch.library.register_fake("posttrain::selective_log_softmax_bwd")
    def _(logits, targets, lse, entropy, grad_logprob, grad_entropy, temperature, ignore_index):
        return torch.empty_like(logits)

    def setup_context(ctx, inputs, output):
        logits, targets, temperature, ignore_index, with_entropy = inputs
        _, entropy, lse = output
        ctx.save_for_backward(logits, targets, lse, entropy if with_entropy else None)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index

    def backward(ctx, grad_logprob, grad_entropy, _grad_lse):
        logits, targets, lse, entropy = ctx.saved_tensors
        grad_entropy = grad_entropy if entropy is not None else None
        grad_logits = ops.selective_log_softmax_bwd(
            logits, targets, lse, entropy, _as_rows(grad_logprob), _as_rows(grad_entropy), ctx.temperature,
            ctx.ignore_index,
        )  # fmt: skip
        return grad_logits, None, None, None, None

    torch.library.register_autograd("posttrain::selective_log_softmax_fwd", backward, setup_context=setup_context)


def _as_rows(grad):
    return grad.float().contiguous() if grad is not None else None


def _grpo_scalars(cfg: dict) -> tuple:
    from posttrain.kernels.grpo import LOSS_CODES

    return (
        float(cfg["beta"]), float(cfg["epsilon_low"]), float(cfg["epsilon_high"]),
        None if cfg["delta"] is None else float(cfg["delta"]),
        float(cfg["sapo_temperature_pos"]), float(cfg["sapo_temperature_neg"]), LOSS_CODES[cfg["loss_type"]],
        cfg["importance_sampling_level"] == "sequence", bool(cfg["use_bias_correction_kl"]),
    )  # fmt: skip


_GRPO_LOSS_OUTPUTS = ("loss", "tokens", "kl", "clip_low", "clip_high", "clip_region", "coef", "dcoef")


def grpo_loss_fwd_cuda(logps, old_logps, ref_logps, advantages, mask, cfg) -> dict[str, torch.Tensor]:
    """posttrain::grpo_loss_fwd with the contract of posttrain.kernels.grpo.grpo_loss_fwd."""
    old_logps = old_logps if old_logps is not None else logps
    ref_logps = ref_logps if cfg["beta"] != 0.0 else None
    outs = torch.ops.posttrain.grpo_loss_fwd(
        logps, old_logps, ref_logps, advantages, mask, cfg.get("policy_weights"), *_grpo_scalars(cfg)
    )
    out = dict(zip(_GRPO_LOSS_OUTPUTS, outs))
    if ref_logps is None:
        del out["kl"]
    if cfg["importance_sampling_level"] != "sequence":
        del out["coef"], out["dcoef"]
    return out


def grpo_loss_bwd_cuda(logps, old_logps, ref_logps, advantages, mask, grad_rows, saved, cfg) -> torch.Tensor:
    """posttrain::grpo_loss_bwd with the contract of posttrain.kernels.grpo.grpo_loss_bwd."""
    old_logps = old_logps if old_logps is not None else logps
    ref_logps = ref_logps if cfg["beta"] != 0.0 else None
    tokens = saved["tokens"]
    dlogps = torch.ops.posttrain.grpo_loss_bwd(
        logps, old_logps, ref_logps, advantages, mask, cfg.get("policy_weights"), grad_rows, tokens,
        saved.get("coef", tokens),
        saved.get("dcoef", tokens), *_grpo_scalars(cfg),
    )  # fmt: skip
    return dlogps.to(logps.dtype)


def grpo_advantages_cuda(rewards, weights, num_generations, scale_rewards, normalize_then_sum, return_std, std_eps):
    """posttrain::grpo_advantages with the contract of posttrain.kernels.grpo.grpo_advantages_fwd."""
    from posttrain.kernels.grpo import SCALE_CODES

    advantages, std = torch.ops.posttrain.grpo_advantages(
        rewards, weights, num_generations, SCALE_CODES[scale_rewards], normalize_then_sum, return_std, std_eps
    )
    return advantages, std if return_std else None


def _register_grpo_fakes() -> None:
    @torch.library.register_fake("posttrain::grpo_advantages")
    def _(rewards, weights, num_generations, scale, normalize_then_sum, return_std, std_eps):
        batch = rewards.shape[0]
        return rewards.new_empty(batch, dtype=torch.float32), rewards.new_empty(
            batch if return_std else 0, dtype=torch.float32
        )

    @torch.library.register_fake("posttrain::grpo_loss_fwd")
    def _(logps, old_logps, ref_logps, advantages, mask, policy_weights, *options):
        return [logps.new_empty(logps.shape[0], dtype=torch.float32) for _ in _GRPO_LOSS_OUTPUTS]

    @torch.library.register_fake("posttrain::grpo_loss_bwd")
    def _(logps, old_logps, ref_logps, advantages, mask, policy_weights, grad_rows, tokens, coef, dcoef, *options):
        return logps.new_empty(logps.shape, dtype=torch.float32)
