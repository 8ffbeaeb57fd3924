"""The implementations a benchmark compares, per op. A provider whose package is missing is reported, not fatal."""

import importlib.util

import torch

from posttrain.ops import fused_linear_logprob

# TRL's trainers call its fused head with this vocabulary chunk (trl/trainer/utils.py, TRL 1.16)
TRL_CHUNK_SIZE = 32768


def _posttrain(hidden, weight, targets):
    return fused_linear_logprob(hidden, weight, targets, impl="triton")


def _torch_reference(hidden, weight, targets):
    return fused_linear_logprob(hidden, weight, targets, impl="torch")


def _trl_fused_head(hidden, weight, targets):
    from trl.kernels import ChunkedLogProbFunction

    logprobs, *_ = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, TRL_CHUNK_SIZE, None, 1.0, ())
    return logprobs


def _liger_flce(hidden, weight, targets):
    # Liger returns the summed NLL (gradients computed in its forward), not per-token log-probs: same GEMM work
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return -liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="sum")


FUSED_LINEAR_LOGPROB = {
    "posttrain": (_posttrain, None),
    "torch": (_torch_reference, None),
    "trl": (_trl_fused_head, "trl"),
    "liger": (_liger_flce, "liger_kernel"),
}


def available(providers: dict) -> tuple[dict, list[str]]:
    """Split `providers` into the runnable ones and notes about those whose package is not installed."""
    runnable, notes = {}, []
    for name, (fn, package) in providers.items():
        if package is None or importlib.util.find_spec(package) is not None:
            runnable[name] = fn
        else:
            notes.append(f"{name}: skipped, {package} is not installed")
    return runnable, notes


def fused_linear_logprob_inputs(n, h, v, dtype=torch.bfloat16, device="cuda", seed=0):
    """hidden [n, h] and weight [v, h] needing grad (logits ~ N(0, 1)), targets [n], a float32 upstream gradient."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, device=device, dtype=dtype, generator=gen).requires_grad_()
    weight = (torch.randn(v, h, device=device, dtype=dtype, generator=gen) / h**0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device, generator=gen)
    return hidden, weight, targets
