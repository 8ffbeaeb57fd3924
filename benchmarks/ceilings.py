"""The device's ceilings, measured in the same run as the benchmarks: a large GEMM, a large device copy, and the cuBLAS
GEMMs a fused LM-head op must at least do."""

import torch

from benchmarks.timing import quantiles_ms


def matmul_tflops(dtype: torch.dtype, device, size: int = 8192) -> float:
    """TFLOP/s of a size^3 cuBLAS GEMM on random data (the compute ceiling)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    ms = quantiles_ms(lambda: a @ b, device).p50
    return 2 * size**3 / (ms * 1e-3) / 1e12


def copy_gbps(device, n_bytes: int = 2**30) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written (the memory ceiling)."""
    src = torch.randint(0, 255, (n_bytes,), device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = quantiles_ms(lambda: dst.copy_(src), device).p50
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def gemm_floor(n: int, h: int, v: int, dtype: torch.dtype, device) -> dict:
    """Median milliseconds of the three cuBLAS GEMMs of an LM head's forward+backward, each N x H x V: the logits
    (hidden @ weight.T), dH = dlogits @ weight and dW = dlogits.T @ hidden; and the floors they add up to.

    floor4_ms: what fused_linear_logprob must at least do (the logits twice: the backward recomputes them);
    floor3_ms: what a fused linear loss must at least do (its gradients are computed in the forward).
    """
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, device=device, dtype=dtype, generator=gen)
    weight = torch.randn(v, h, device=device, dtype=dtype, generator=gen) / h**0.5
    dlogits = torch.randn(n, v, device=device, dtype=dtype, generator=gen)
    logits_ms = quantiles_ms(lambda: hidden @ weight.T, device).p50
    dh_ms = quantiles_ms(lambda: dlogits @ weight, device).p50
    dw_ms = quantiles_ms(lambda: dlogits.T @ hidden, device).p50
    return {"logits_ms": logits_ms, "dh_ms": dh_ms, "dw_ms": dw_ms, "floor4_ms": 2 * logits_ms + dh_ms + dw_ms,
            "floor3_ms": logits_ms + dh_ms + dw_ms}  # fmt: skip
