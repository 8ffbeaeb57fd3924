"""The implementations each benchmark compares. A provider names the package it needs and the devices it runs on;
one whose package is missing (or that cannot run on the device) is dropped with a note, never fatal."""

import importlib.util
from dataclasses import dataclass
from collections.abc import Callable

import torch

from posttrain.ops import (
    dpo_loss,
    dpo_loss_ref,
    fused_linear_logprob,
    grpo_advantages,
    grpo_advantages_ref,
    grpo_loss,
    grpo_loss_ref,
    selective_log_softmax,
)

# TRL's trainers call its fused head with this vocabulary chunk (trl/trainer/utils.py, TRL 1.16)
TRL_CHUNK_SIZE = 32768


@dataclass(frozen=True)
class Provider:
    fn: Callable[[dict], torch.Tensor]
    package: str | None = None
    devices: tuple[str, ...] = ("cuda", "cpu")


def available(providers: dict[str, Provider], device: str) -> tuple[dict[str, Provider], list[str]]:
    """Split `providers` into those that can run on `device` and notes about the others."""
    runnable, notes = {}, []
    for name, provider in providers.items():
        if provider.package is not None and importlib.util.find_spec(provider.package) is None:
            notes.append(f"{name}: dropped, {provider.package} is not installed")
        elif device not in provider.devices:
            notes.append(f"{name}: dropped, does not run on {device}")
        else:
            runnable[name] = provider
    return runnable, notes


@torch.compile(dynamic=False)
def _compiled_full_logits_logprob(hidden, weight, targets):
    logits = (hidden @ weight.T).float()
    return logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@torch.compile(dynamic=False)
def _compiled_log_softmax_gather(logits, targets):
    return logits.float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _trl_fused_head(x):
    from trl.kernels import ChunkedLogProbFunction

    logprobs, *_ = ChunkedLogProbFunction.apply(
        x["hidden"], x["weight"], None, x["targets"], 1.0, TRL_CHUNK_SIZE, None, 1.0, ()
    )
    return logprobs


def _liger_flce(x):
    # Liger's usual path: the summed NLL, gradients computed during the forward (a scalar output)
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return -liger_fused_linear_cross_entropy(x["hidden"], x["weight"], x["targets"], reduction="sum")


def _trl_selective_log_softmax(x):
    from trl.trainer.utils import selective_log_softmax as trl_selective_log_softmax

    return trl_selective_log_softmax(x["logits"], x["targets"])


FUSED_LINEAR_LOGPROB = {
    "posttrain": Provider(lambda x: fused_linear_logprob(x["hidden"], x["weight"], x["targets"], impl="triton")),
    "torch": Provider(lambda x: fused_linear_logprob(x["hidden"], x["weight"], x["targets"], impl="torch")),
    "torch_compile": Provider(
        lambda x: _compiled_full_logits_logprob(x["hidden"], x["weight"], x["targets"]), devices=("cuda",)
    ),
    "trl": Provider(_trl_fused_head, "trl"),
    "liger": Provider(_liger_flce, "liger_kernel", devices=("cuda",)),
}

# the CUDA extension (csrc/), when built into the environment
CUDA_EXTENSION = "posttrain._C"

SELECTIVE_LOG_SOFTMAX = {
    "posttrain": Provider(lambda x: selective_log_softmax(x["logits"], x["targets"], impl="triton")),
    "posttrain_cuda": Provider(
        lambda x: selective_log_softmax(x["logits"], x["targets"], impl="cuda"), CUDA_EXTENSION, ("cuda",)
    ),
    "torch": Provider(lambda x: selective_log_softmax(x["logits"], x["targets"], impl="torch")),
    "torch_compile": Provider(lambda x: _compiled_log_softmax_gather(x["logits"], x["targets"]), devices=("cuda",)),
    "trl": Provider(_trl_selective_log_softmax, "trl"),
}


def _dpo_args(x):
    return x["chosen"], x["rejected"], x["ref_chosen"], x["ref_rejected"]


_compiled_dpo_ref = torch.compile(dpo_loss_ref, dynamic=False)

DPO_LOSS = {
    "posttrain": Provider(lambda x: dpo_loss(*_dpo_args(x), impl="triton")),
    "torch": Provider(lambda x: dpo_loss(*_dpo_args(x), impl="torch")),
    "torch_compile": Provider(lambda x: _compiled_dpo_ref(*_dpo_args(x)), devices=("cuda",)),
}


def _advantages(impl):
    return lambda x: grpo_advantages(x["rewards"], x["num_generations"], impl=impl)


_compiled_advantages_ref = torch.compile(grpo_advantages_ref, dynamic=False)

GRPO_ADVANTAGES = {
    "posttrain": Provider(_advantages("triton")),
    "posttrain_cuda": Provider(_advantages("cuda"), CUDA_EXTENSION, ("cuda",)),
    "torch": Provider(_advantages("torch")),
    "torch_compile": Provider(
        lambda x: _compiled_advantages_ref(x["rewards"], x["num_generations"]), devices=("cuda",)
    ),
}


def _loss_kwargs(x):
    return dict(ref_logps=x["ref_logps"], beta=0.04, loss_type="dapo")


def _grpo_loss(impl):
    return lambda x: grpo_loss(x["logps"], x["old_logps"], x["advantages"], x["mask"], impl=impl, **_loss_kwargs(x))


_compiled_grpo_loss_ref = torch.compile(grpo_loss_ref, dynamic=False)

GRPO_LOSS = {
    "posttrain": Provider(_grpo_loss("triton")),
    "posttrain_cuda": Provider(_grpo_loss("cuda"), CUDA_EXTENSION, ("cuda",)),
    "torch": Provider(_grpo_loss("torch")),
    "torch_compile": Provider(
        lambda x: _compiled_grpo_loss_ref(x["logps"], x["old_logps"], x["advantages"], x["mask"], **_loss_kwargs(x)),
        devices=("cuda",),
    ),
}
