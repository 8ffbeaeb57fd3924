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
    floor(shape) lists the cuBLAS GEMMs an LM-head op's forward+backward must at least do, as ((N, H, V), name) terms
    naming a time of ceilings.gemm_floor measured in the same run at that GEMM shape; the floor is their sum.
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
    floor: Callable[[dict], list[tuple[tuple[int, int, int], str]]] | None = None
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


# tokens per sequence in the loss rows (GRPO's advantage is per sequence)
SEQ_LEN = 1024


def linear_loss_inputs(shape, dtype, device, seed=0):
    """linear_logprob_inputs plus what a trainer's loss takes: the old policy's and the reference's log-probs [N]
    (float32), one advantage per sequence of SEQ_LEN tokens repeated over its tokens [N], the rows [N] and the batch's
    token count (the loss normalizer, known up front)."""
    x = linear_logprob_inputs(shape, dtype, device, seed)
    n = shape["N"]
    gen = _generator(device, seed + 1000)
    x["old_logps"] = -3 * torch.rand(n, device=device, generator=gen)
    x["ref_logps"] = x["old_logps"] + 0.1 * torch.randn(n, device=device, generator=gen)
    sequences = torch.randn(-(-n // SEQ_LEN), device=device, generator=gen)
    x["advantages"] = sequences.repeat_interleave(SEQ_LEN)[:n]
    x["rows"] = torch.arange(n, device=device)
    x["num_tokens"] = n
    return x


def _linear_loss_flops(shape, mode):
    # the logits, dH and dW: three N x H x V GEMMs (an implementation that recomputes the logits does a fourth)
    return 3 * 2.0 * shape["N"] * shape["H"] * shape["V"]


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


def dpo_inputs(shape, dtype, device, seed=0):
    """Summed sequence log-probs [B] of policy (needing grad) and reference, and grad_output [B]."""
    gen = _generator(device, seed)
    b = shape["B"]

    def logps():
        return -200 * torch.rand(b, device=device, generator=gen) - 10

    chosen, rejected = logps().to(dtype).requires_grad_(), logps().to(dtype).requires_grad_()
    return {"chosen": chosen, "rejected": rejected, "ref_chosen": logps().to(dtype),
            "ref_rejected": logps().to(dtype), "grad_output": torch.randn(b, device=device, generator=gen)}  # fmt: skip


def _dpo_bytes(shape, dtype, mode):
    # four [B] inputs and the [B] output forward; the backward reads them again and writes two gradients
    b = shape["B"] * FLOAT_BYTES[dtype]
    return {"forward": 5 * b, "backward": 8 * b, "full": 8 * b}[mode]


def advantages_inputs(shape, dtype, device, seed=0):
    """Rewards [B, R] with 10% NaN (reward functions that returned None); B = groups x generations."""
    gen = _generator(device, seed)
    b = shape["groups"] * shape["G"]
    rewards = torch.randn(b, shape["R"], device=device, generator=gen).to(dtype)
    rewards[torch.rand(b, shape["R"], device=device, generator=gen) < 0.1] = float("nan")
    return {"rewards": rewards, "num_generations": shape["G"], "grad_output": torch.zeros(b, device=device)}


def _advantages_bytes(shape, dtype, mode):
    b = shape["groups"] * shape["G"]
    return b * shape["R"] * FLOAT_BYTES[dtype] + 4 * b


def grpo_loss_inputs(shape, dtype, device, seed=0):
    """Per-token log-probs [B, T] of the policy (needing grad), old policy and reference, advantages [B], a mask with
    ragged completion lengths; grad_output is the scalar loss's."""
    gen = _generator(device, seed)
    b, t = shape["B"], shape["T"]

    def logps():
        return (-3 * torch.rand(b, t, device=device, generator=gen)).to(dtype)

    lengths = torch.randint(1, t + 1, (b, 1), device=device, generator=gen)
    mask = torch.arange(t, device=device)[None] < lengths
    return {"logps": logps().requires_grad_(), "old_logps": logps(), "ref_logps": logps(),
            "advantages": torch.randn(b, device=device, generator=gen), "mask": mask,
            "grad_output": torch.ones((), device=device)}  # fmt: skip


def _grpo_loss_bytes(shape, dtype, mode):
    # forward reads logps, old, ref and the mask; the backward reads them again and writes dlogps
    tokens = shape["B"] * shape["T"]
    forward = tokens * (3 * FLOAT_BYTES[dtype] + 1)
    return {"forward": forward, "backward": forward + tokens * FLOAT_BYTES[dtype], "full": 2 * forward + tokens * 4}[
        mode
    ]


def head_floor(name: str):
    """The floor of an (N, H, V) head: one gemm_floor time ("floor4_ms": the logits recomputed; "floor3_ms": not)."""
    return lambda shape: [((shape["N"], shape["H"], shape["V"]), name)]


# the share of rows a distillation mask counts (completion tokens): exactly this many, at random places
DIVERGENCE_MASK_FRACTION = 0.9
# TRL's DistillationConfig default
DIVERGENCE_TEMPERATURE = 1.0


def counted_rows(shape) -> int:
    return round(DIVERGENCE_MASK_FRACTION * shape["N"])


def linear_divergence_inputs(shape, dtype, device, seed=0):
    """student_hidden [N, Hs] and student_weight [V, Hs] / sqrt(Hs) (both needing grad), teacher_hidden [N, Ht],
    teacher_weight [V, Ht] / sqrt(Ht), mask [N] bool with exactly counted_rows(shape) True at random places, and a
    scalar grad_output (the loss is a mean)."""
    n, hs, ht, v = shape["N"], shape["Hs"], shape["Ht"], shape["V"]
    gen = _generator(device, seed)
    student_hidden = torch.randn(n, hs, device=device, dtype=dtype, generator=gen).requires_grad_()
    student_weight = (torch.randn(v, hs, device=device, dtype=dtype, generator=gen) / hs**0.5).requires_grad_()
    teacher_hidden = torch.randn(n, ht, device=device, dtype=dtype, generator=gen)
    teacher_weight = torch.randn(v, ht, device=device, dtype=dtype, generator=gen) / ht**0.5
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[torch.randperm(n, device=device, generator=gen)[: counted_rows(shape)]] = True
    return {"student_hidden": student_hidden, "student_weight": student_weight, "teacher_hidden": teacher_hidden,
            "teacher_weight": teacher_weight, "mask": mask, "grad_output": torch.ones((), device=device)}  # fmt: skip


def _divergence_flops(shape, mode):
    # over the counted rows: both heads' logits forward; full adds the student's dH and dW
    gemm_rows = 2.0 * counted_rows(shape) * shape["V"]
    return gemm_rows * ({"forward": shape["Hs"] + shape["Ht"], "full": 3 * shape["Hs"] + shape["Ht"]}[mode])


def _divergence_bytes(shape, dtype, mode):
    n, hs, ht, v = shape["N"], shape["Hs"], shape["Ht"], shape["V"]
    student = (n * hs + v * hs) * FLOAT_BYTES[dtype]
    inputs = student + (n * ht + v * ht) * FLOAT_BYTES[dtype]
    return {"forward": inputs, "full": inputs + student}[mode]


def _divergence_floor(shape):
    # four GEMMs over the counted rows: the student's logits, dH and dW (gemm_floor's three) and the teacher's logits
    n, v = counted_rows(shape), shape["V"]
    return [((n, shape["Hs"], v), "floor3_ms"), ((n, shape["Ht"], v), "logits_ms")]


# beta of each divergence entry: forward KL, the symmetric JSD, reverse KL (TRL's DistillationConfig default)
DIVERGENCE_BETAS = {"fkl": 0.0, "jsd": 0.5, "rkl": 1.0}

HEADLINE_SHAPES = [
    {"N": 8192, "H": 896, "V": 151936},  # Qwen2-0.5B's head
    {"N": 16384, "H": 4096, "V": 151936},  # a 7B-class head
]

REGISTRY: dict[str, OpBenchmark] = {
    "fused_linear_logprob": OpBenchmark(
        name="fused_linear_logprob",
        make_inputs=linear_logprob_inputs,
        providers=P.FUSED_LINEAR_LOGPROB,
        shapes=[
            *HEADLINE_SHAPES,
            {"N": 4096, "H": 2048, "V": 128256},  # Llama-3.2-1B-like
            {"N": 16384, "H": 1536, "V": 151936},  # Qwen2-1.5B, a long batch
        ],
        smoke_shapes=[{"N": 37, "H": 32, "V": 1000}],
        grad_names=("hidden", "weight"),
        flops=_linear_logprob_flops,
        moved_bytes=_linear_logprob_bytes,
        floor=head_floor("floor4_ms"),
    ),
    **{
        f"fused_linear_loss_{loss}": OpBenchmark(
            name=f"fused_linear_loss_{loss}",
            make_inputs=linear_loss_inputs,
            providers=providers,
            shapes=HEADLINE_SHAPES,
            smoke_shapes=[{"N": 37, "H": 32, "V": 1000}],
            grad_names=("hidden", "weight"),
            flops=_linear_loss_flops,
            moved_bytes=_linear_logprob_bytes,
            modes=("full",),
            floor=head_floor("floor3_ms"),
        )
        for loss, providers in (("sft", P.FUSED_LINEAR_LOSS_SFT), ("grpo", P.FUSED_LINEAR_LOSS_GRPO))
    },
    **{
        f"fused_linear_divergence_{name}": OpBenchmark(
            name=f"fused_linear_divergence_{name}",
            make_inputs=linear_divergence_inputs,
            providers=P.linear_divergence_providers(beta, DIVERGENCE_TEMPERATURE),
            shapes=[
                {"N": 8192, "Hs": 896, "Ht": 1536, "V": 151936},  # Qwen2-0.5B from Qwen2-1.5B
                {"N": 16384, "Hs": 1536, "Ht": 3584, "V": 151936},  # Qwen2-1.5B from Qwen2-7B
                {"N": 4096, "Hs": 2048, "Ht": 4096, "V": 128256},  # Llama-3.2-1B from Llama-3.1-8B
            ],
            smoke_shapes=[{"N": 37, "Hs": 32, "Ht": 48, "V": 1000}],
            grad_names=("student_hidden", "student_weight"),
            flops=_divergence_flops,
            moved_bytes=_divergence_bytes,
            modes=("forward", "full"),
            floor=_divergence_floor,
        )
        for name, beta in DIVERGENCE_BETAS.items()
    },
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
    "dpo_loss": OpBenchmark(
        name="dpo_loss",
        make_inputs=dpo_inputs,
        providers=P.DPO_LOSS,
        shapes=[{"B": 64}, {"B": 4096}, {"B": 262144}],
        smoke_shapes=[{"B": 7}],
        grad_names=("chosen", "rejected"),
        moved_bytes=_dpo_bytes,
        bound="memory",
    ),
    "grpo_advantages": OpBenchmark(
        name="grpo_advantages",
        make_inputs=advantages_inputs,
        providers=P.GRPO_ADVANTAGES,
        shapes=[{"groups": 128, "G": 8, "R": 2}, {"groups": 1024, "G": 16, "R": 4}],
        smoke_shapes=[{"groups": 3, "G": 4, "R": 2}],
        moved_bytes=_advantages_bytes,
        modes=("forward",),
        bound="memory",
    ),
    "grpo_loss": OpBenchmark(
        name="grpo_loss",
        make_inputs=grpo_loss_inputs,
        providers=P.GRPO_LOSS,
        shapes=[{"B": 64, "T": 1024}, {"B": 256, "T": 4096}, {"B": 1024, "T": 2048}],
        smoke_shapes=[{"B": 6, "T": 37}],
        grad_names=("logps",),
        moved_bytes=_grpo_loss_bytes,
        bound="memory",
    ),
}
