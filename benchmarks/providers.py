"""The implementations each benchmark compares. A provider names the module it needs and the devices it runs on;
one whose module is missing (or that cannot run on the device) is dropped with a note, never fatal."""

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

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
# posttrain's 3-GEMM fused linear loss and its fused linear divergence: older commits (--base) lack them
FUSED_LOSS_MODULE = "posttrain.ops.fused_linear_loss"
DIVERGENCE_MODULE = "posttrain.ops.fused_linear_divergence"


@dataclass(frozen=True)
class Provider:
    fn: Callable[[dict], torch.Tensor]
    package: str | None = None
    devices: tuple[str, ...] = ("cuda", "cpu")


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False


def available(providers: dict[str, Provider], device: str) -> tuple[dict[str, Provider], list[str]]:
    """Split `providers` into those that can run on `device` and notes about the others."""
    runnable, notes = {}, []
    for name, provider in providers.items():
        if provider.package is not None and not importable(provider.package):
            notes.append(f"{name}: dropped, {provider.package} is not importable")
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
    # Liger's usual path: the summed NLL, gradients computed during the forward (a scalar output). An easier problem
    # than per-token log-probs with an upstream gradient known only in the backward: report.py labels it so.
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


# ---- The fused linear loss rows: a trainer's whole head, log-probs to loss, forward and backward ----

GRPO_EPSILON, GRPO_EPSILON_HIGH, GRPO_BETA = 0.2, 0.28, 0.04


def sft_nll(logprobs, rows, x):
    """SFT's token-mean NLL, its normalizer (the batch's token count) known up front."""
    return -logprobs.sum() / x["num_tokens"]


def grpo_clipped(logprobs, rows, x):
    """A GRPO step's loss (DAPO's normalizer: the batch's token count): the clipped importance ratio against the old
    policy times the advantage, plus beta times the k3 estimate of the KL divergence to the reference policy."""
    old, ref, advantages = x["old_logps"][rows], x["ref_logps"][rows], x["advantages"][rows]
    ratio = torch.exp(logprobs - old)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - GRPO_EPSILON, 1 + GRPO_EPSILON_HIGH) * advantages)
    kl = torch.exp(ref - logprobs) - (ref - logprobs) - 1
    return (GRPO_BETA * kl - surrogate).sum() / x["num_tokens"]


def _fused_loss(loss, impl):
    def run(x):
        from posttrain.ops.fused_linear_loss import fused_linear_loss

        return fused_linear_loss(
            x["hidden"], x["weight"], x["targets"], lambda chunk: loss(chunk.logprobs, chunk.rows, x), impl=impl
        ).loss

    return run


def _liger_sft(x):
    # the same problem as sft_nll: Liger's summed cross entropy over the batch's token count
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(x["hidden"], x["weight"], x["targets"], reduction="sum") / x["num_tokens"]


def linear_loss_providers(loss, liger=None) -> dict[str, Provider]:
    """posttrain's fused linear loss (3 GEMMs) against its 4-GEMM log-prob op, TRL's head and Liger (when it solves
    the same problem) each followed by the same `loss` in torch, and the fused loss's torch path."""
    providers = {
        "posttrain": Provider(_fused_loss(loss, "triton"), FUSED_LOSS_MODULE),
        "posttrain_logprob": Provider(
            lambda x: loss(fused_linear_logprob(x["hidden"], x["weight"], x["targets"], impl="triton"), x["rows"], x)
        ),
        "torch": Provider(_fused_loss(loss, "torch"), FUSED_LOSS_MODULE),
        "trl": Provider(lambda x: loss(_trl_fused_head(x), x["rows"], x), "trl"),
    }
    if liger is not None:
        providers["liger"] = Provider(liger, "liger_kernel", ("cuda",))
    return providers


FUSED_LINEAR_LOSS_SFT = linear_loss_providers(sft_nll, liger=_liger_sft)
FUSED_LINEAR_LOSS_GRPO = linear_loss_providers(grpo_clipped)


# ---- The fused linear divergence rows: a distillation step's loss from both models' hidden states ----


def _divergence_args(x):
    return x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], x["mask"]


def _posttrain_divergence(beta, temperature, impl):
    def run(x):
        from posttrain.ops.fused_linear_divergence import fused_linear_divergence

        return fused_linear_divergence(*_divergence_args(x), beta=beta, temperature=temperature, impl=impl).loss

    return run


def _trl_divergence(beta, temperature):
    # TRL 1.16's DistillationTrainer loss (its chunked Triton head on CUDA), the mean over the counted rows
    def run(x):
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        s_hidden, s_weight, t_hidden, t_weight, mask = _divergence_args(x)
        return _chunked_divergence_loss(s_hidden, t_hidden, s_weight, t_weight, mask.long(), beta,
                                        temperature=temperature)[0]  # fmt: skip

    return run


def _liger_divergence(beta, temperature):
    # Liger's fused linear JSD: the same mean over the rows whose label is not -100, gradients in the forward (as
    # posttrain's "mean"); its module holds no parameters, so building it per call costs nothing
    def run(x):
        from liger_kernel.transformers import LigerFusedLinearJSD

        s_hidden, s_weight, t_hidden, t_weight, mask = _divergence_args(x)
        labels = torch.where(mask, 0, -100)
        return LigerFusedLinearJSD(jsd_beta=beta, temperature=temperature)(s_hidden, s_weight, t_hidden, t_weight,
                                                                          labels)  # fmt: skip

    return run


def linear_divergence_providers(beta: float, temperature: float) -> dict[str, Provider]:
    """posttrain's fused linear divergence (Triton and its chunked torch reference), TRL 1.16's chunked divergence
    and Liger's fused linear JSD, all computing the generalized JSD with `beta` at `temperature`, averaged over the
    rows the mask counts."""
    return {
        "posttrain": Provider(_posttrain_divergence(beta, temperature, "triton"), DIVERGENCE_MODULE),
        "torch": Provider(_posttrain_divergence(beta, temperature, "torch"), DIVERGENCE_MODULE),
        "trl": Provider(_trl_divergence(beta, temperature), "trl.trainer.distillation_trainer"),
        "liger": Provider(_liger_divergence(beta, temperature), "liger_kernel", ("cuda",)),
    }
