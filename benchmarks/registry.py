"""The op benchmarks: inputs, providers, shape sweeps, and the FLOPs and bytes each op must at least do and move."""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from benchmarks import providers as P

FLOAT_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


@dataclass
class OpBenchmark:
    """One op to benchmark.

    make_inputs(shape, dtype, device, seed) returns a dict of tensors, including the leaves named in grad_names (which
    require grad) and "grad_output" (the upstream gradient of the provider's output). flops(shape, mode) and
    moved_bytes(shape, dtype, mode) are the work any implementation must do: they turn times into TFLOP/s and GB/s.
    """

    name: str
    make_inputs: Callable[..., dict]
    providers: dict[str, P.Provider]
    shapes: list[dict]
    smoke_shapes: list[dict]
    grad_names: tuple[str, ...] = ()
    flops: Callable[[dict, str], float] | None = None
    moved_bytes: Callable[[dict, torch.dtype, str], float] | None = None
    modes: tuple[str, ...] = ("forward", "backward", "full")
    bound: str = "compute"  # which ceiling its rows are compared with: "compute" (matmul) or "memory" (copy)
    baseline: str = "torch"
    extra: dict = field(default_factory=dict)


def _generator(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def linear_logprob_inputs(shape, dtype, device, seed=0):
    """hidden [N, H], weight [V, H] (logits ~ N(0, 1)), targets [N], grad_output [N] float32."""
    n, h, v = shape["N"], shape["H"], shape["V"]
    gen = _generator(device, seed)
    hidden = torch.randn(n, h, device=device, dtype=dtype, generator=gen).requires_grad_()
    weight = (torch.randn(v, h, device=device, dtype=dtype, generator=gen) / h**0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device, generator=gen)
    grad_output = torch.randn(n, device=device, generator=gen)
    return {"hidden": hidden, "weight": weight, "targets": targets, "grad_output": grad_output}


def _linear_logprob_flops(shape, mode):
    # one N x H x V GEMM forward; the backward recomputes the logits and does dH and dW
    gemm = 2.0 * shape["N"] * shape["H"] * shape["V"]
    return {"forward": gemm, "backward": 3 * gemm, "full": 4 * gemm}[mode]


def _linear_logprob_bytes(shape, dtype, mode):
    n, h, v = shape["N"], shape["H"], shape["V"]
    inputs = (n * h + v * h) * FLOAT_BYTES[dtype]
    grads = inputs
    return {"forward": inputs, "backward": inputs + grads, "full": inputs + grads}[mode]


def selective_inputs(shape, dtype, device, seed=0):
    """logits [N, V] (scaled like real ones), targets [N], grad_output [N] float32."""
    n, v = shape["N"], shape["V"]
    gen = _generator(device, seed)
    logits = (3 * torch.randn(n, v, device=device, dtype=torch.float32, generator=gen)).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device, generator=gen)
    return {"logits": logits, "targets": targets, "grad_output": torch.randn(n, device=device, generator=gen)}


def _selective_bytes(shape, dtype, mode):
    # forward reads the logits once; backward reads them and writes their gradient
    logits = shape["N"] * shape["V"] * FLOAT_BYTES[dtype]
    return {"forward": logits, "backward": 2 * logits, "full": 3 * logits}[mode]


REGISTRY: dict[str, OpBenchmark] = {
    "fused_linear_logprob": OpBenchmark(
        name="fused_linear_logprob",
        make_inputs=linear_logprob_inputs,
        providers=P.FUSED_LINEAR_LOGPROB,
        shapes=[
            {"N": 8192, "H": 896, "V": 151936},  # Qwen2-0.5B's head
            {"N": 16384, "H": 4096, "V": 151936},  # a 7B-class head
            {"N": 4096, "H": 2048, "V": 128256},  # Llama-3.2-1B-like
            {"N": 16384, "H": 1536, "V": 151936},  # Qwen2-1.5B, a long batch
        ],
        smoke_shapes=[{"N": 37, "H": 32, "V": 1000}],
        grad_names=("hidden", "weight"),
        flops=_linear_logprob_flops,
        moved_bytes=_linear_logprob_bytes,
    ),
    "selective_log_softmax": OpBenchmark(
        name="selective_log_softmax",
        make_inputs=selective_inputs,
        providers=P.SELECTIVE_LOG_SOFTMAX,
        shapes=[{"N": 8192, "V": 151936}, {"N": 16384, "V": 32000}, {"N": 4096, "V": 128256}],
        smoke_shapes=[{"N": 16, "V": 1000}],
        grad_names=("logits",),
        moved_bytes=_selective_bytes,
        bound="memory",
    ),
}
