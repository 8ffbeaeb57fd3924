"""The device's ceilings, measured in the same run as the benchmarks: a large GEMM and a large device copy."""

import torch

from benchmarks.timing import quantiles_ms


def matmul_tflops(dtype: torch.dtype, device, size: int = 8192) -> float:
    """TFLOP/s of a size^3 cuBLAS GEMM on random data (the compute ceiling)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    _, ms, _ = quantiles_ms(lambda: a @ b, device)
    return 2 * size**3 / (ms * 1e-3) / 1e12


def copy_gbps(device, n_bytes: int = 2**30) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written (the memory ceiling)."""
    src = torch.randint(0, 255, (n_bytes,), device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    _, ms, _ = quantiles_ms(lambda: dst.copy_(src), device)
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def gemm_floor_ms(n: int, h: int, v: int, dtype: torch.dtype, device) -> float:
    """Milliseconds of the cuBLAS GEMMs fused_linear_logprob's forward+backward must at least do: the logits (forward,
    and again in the backward), dH = dlogits @ W and dW = dlogits.T @ H, each N x H x V."""
    hidden = torch.randn(n, h, device=device, dtype=dtype)
    weight = torch.randn(v, h, device=device, dtype=dtype)
    dlogits = torch.randn(n, v, device=device, dtype=dtype)
    logits_ms = quantiles_ms(lambda: hidden @ weight.T, device)[1]
    dh_ms = quantiles_ms(lambda: dlogits @ weight, device)[1]
    dw_ms = quantiles_ms(lambda: dlogits.T @ hidden, device)[1]
    return 2 * logits_ms + dh_ms + dw_ms
