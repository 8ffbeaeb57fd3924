"""csrc/: the CUDA kernels compile for Hopper without CUDA PyTorch (nvcc alone), the PyTorch binding type-checks
against torch's headers, and, on a GPU, the custom ops match their references."""

import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("std", ["c++17", "c++20"])
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_kernels_compile_for_sm90_without_spills(source, std, tmp_path):
    result = subprocess.run(
        ["nvcc", f"-std={std}", "-arch=sm_90", "-O3", "-Xptxas", "-v", "-c", str(source), "-o", str(tmp_path / "k.o")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", result.stderr)]
    assert spills and max(spills) == 0, f"register spills in {source.name}: {spills}"


def _cuda_include_dir() -> Path | None:
    import os

    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", nvcc and Path(nvcc).resolve().parents[1]]
    found = [Path(c) / "include" for c in candidates if c and (Path(c) / "include" / "cuda_runtime_api.h").exists()]
    return found[0] if found else None


@pytest.mark.skipif(shutil.which("g++") is None or _cuda_include_dir() is None, reason="needs g++ and CUDA headers")
def test_binding_type_checks_against_torch_headers():
    """The CPU wheel of torch lacks its CUDA headers; tests/csrc/cuda_shim stands in for the two the binding uses
    (the current stream, the device guard), so everything else in bindings.cpp is checked against the real API."""
    from torch.utils.cpp_extension import include_paths

    cuda_include = _cuda_include_dir()
    command = ["g++", "-fsyntax-only", "-std=c++20", f"-I{Path(__file__).parent / 'cuda_shim'}", f"-I{CSRC}",
               *(f"-I{p}" for p in include_paths()), f"-I{sysconfig.get_paths()['include']}", f"-I{cuda_include}",
               str(CSRC / "bindings.cpp")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_extension_absent_falls_back_quietly(recwarn):
    from posttrain.ops import selective_log_softmax
    from posttrain.ops._common import resolve_impl

    logits = torch.randn(4, 50)
    targets = torch.randint(0, 50, (4,))
    selective_log_softmax(logits, targets)  # auto: no error, no warning
    assert not [w for w in recwarn if "posttrain" in str(w.message)]
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="impl='cuda' needs CUDA inputs"):
            resolve_impl("cuda", logits.device, ("auto", "triton", "cuda", "torch"), op="selective_log_softmax")


def _cuda_ops():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from posttrain.ops._cuda import cuda_ops_available, jit_build

    if not cuda_ops_available():
        jit_build()  # a GPU session without a built extension: compile it now
        cuda_ops_available.cache_clear()
        assert cuda_ops_available()
    return torch.ops.posttrain


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,v", [(1, 1000), (37, 50257), (300, 151936), (5, 4097)], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gpu_selective_log_softmax_cuda_matches_references(dtype, n, v, temperature):
    sys.path.insert(0, str(ROOT / "tests"))
    from testing_utils import assert_fa_close

    from posttrain.ops import selective_log_softmax

    _cuda_ops()
    logits64 = (3 * torch.randn(n, v, device="cuda", dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda")
    targets[::4] = -100
    g = [torch.randn(n, device="cuda", dtype=torch.float64) for _ in range(2)]

    def run(impl, logits):
        lp, ent = selective_log_softmax(logits, targets, temperature=temperature, return_entropy=True, impl=impl)
        return [lp, ent, *torch.autograd.grad((lp * g[0]).sum() + (ent * g[1]).sum(), logits)]

    low = lambda: logits64.detach().to(dtype).requires_grad_()  # noqa: E731
    exact, baseline, cuda, triton = run("torch", logits64), run("torch", low()), run("cuda", low()), run("triton", low())
    for name, c, e, b, t in zip(["logprobs", "entropy", "d_logits"], cuda, exact, baseline, triton):
        assert c.dtype == t.dtype
        assert_fa_close(c, e, b, name=f"cuda {name}", atol=1e-5)
        assert (c[targets == -100] == 0).all(), f"{name}: ignored rows must be 0"


@pytest.mark.gpu
def test_gpu_selective_log_softmax_opcheck():
    ops = _cuda_ops()
    logits = torch.randn(7, 333, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 333, (7,), device="cuda")
    torch.library.opcheck(ops.selective_log_softmax_fwd, (logits, targets, 0.8, -100, True))


@pytest.mark.gpu
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("num_generations", [2, 8, 40])
def test_gpu_grpo_advantages_cuda_matches_references(scale_rewards, aggregation, num_generations):
    from posttrain.ops import grpo_advantages

    _cuda_ops()
    rewards = torch.randn(num_generations * 13, 3, device="cuda") * 4
    rewards[torch.rand_like(rewards) < 0.2] = float("nan")
    rewards[:num_generations] = float("nan")  # a group without any reward
    kwargs = dict(reward_weights=torch.tensor([1.0, 0.5, 2.0], device="cuda"), scale_rewards=scale_rewards,
                  multi_objective_aggregation=aggregation, return_std=True)  # fmt: skip
    exact = grpo_advantages(rewards.double(), num_generations, impl="torch", **kwargs)
    for impl in ("cuda", "triton"):
        adv, std = grpo_advantages(rewards, num_generations, impl=impl, **kwargs)
        torch.testing.assert_close(adv.double(), exact[0], rtol=1e-5, atol=1e-5, msg=impl)
        torch.testing.assert_close(std.double(), exact[1], rtol=1e-5, atol=1e-5, equal_nan=True, msg=impl)


@pytest.mark.gpu
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_gpu_grpo_loss_cuda_matches_references(loss_type, level, beta):
    from posttrain.ops import grpo_loss

    _cuda_ops()
    B, T = 6, 37
    logps64 = (-torch.rand(B, T, device="cuda", dtype=torch.float64) * 3).requires_grad_()
    old = logps64.detach() + 0.3 * torch.randn(B, T, device="cuda", dtype=torch.float64)
    ref = logps64.detach() + 0.3 * torch.randn(B, T, device="cuda", dtype=torch.float64)
    adv = torch.randn(B, device="cuda", dtype=torch.float64)
    mask = torch.rand(B, T, device="cuda") > 0.2
    mask[1] = False
    with torch.no_grad():  # what masked-out tokens hold must not matter: selected away, never multiplied by 0
        for tensor in (logps64, old, ref):
            tensor[~mask] = float("nan")
    kwargs = dict(ref_logps=ref, beta=beta, loss_type=loss_type, importance_sampling_level=level,
                  max_completion_length=T, delta=1.5 if loss_type == "grpo" else None, return_metrics=True)  # fmt: skip

    def run(impl, dtype):
        logps = logps64.detach().to(dtype).requires_grad_() if dtype != torch.float64 else logps64
        loss, metrics = grpo_loss(logps, old.to(dtype), adv.to(dtype), mask, impl=impl,
                                  **{**kwargs, "ref_logps": ref.to(dtype)})  # fmt: skip
        (grad,) = torch.autograd.grad(loss, logps)
        return loss, grad, metrics

    exact = run("torch", torch.float64)
    for impl in ("cuda", "triton"):
        loss, grad, metrics = run(impl, torch.float32)
        torch.testing.assert_close(loss.double(), exact[0], rtol=1e-5, atol=1e-6, msg=f"{impl} loss")
        torch.testing.assert_close(grad.double(), exact[1], rtol=1e-4, atol=1e-6, msg=f"{impl} grad")
        assert metrics.logs(loss_type).keys() == exact[2].logs(loss_type).keys()
        for name, value in metrics.logs(loss_type).items():
            torch.testing.assert_close(value.double(), exact[2].logs(loss_type)[name].double(), rtol=1e-5, atol=1e-6,
                                       equal_nan=True, msg=f"{impl} {name}")  # fmt: skip


@pytest.mark.gpu
def test_gpu_grpo_opcheck():
    ops = _cuda_ops()
    rewards = torch.randn(8, 2, device="cuda")
    torch.library.opcheck(ops.grpo_advantages, (rewards, torch.ones(2, device="cuda"), 4, 1, False, True, 1e-4))
    logps = -torch.rand(3, 5, device="cuda")
    args = (logps, logps + 0.1, None, torch.randn(3, device="cuda"), torch.ones(3, 5, device="cuda"), None, 0.0, 0.2,
            0.28, None, 1.0, 1.05, 0, False, True)  # fmt: skip
    torch.library.opcheck(ops.grpo_loss_fwd, args)
