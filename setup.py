"""Package discovery for the kernels/ -> posttrain.kernels mapping declared in pyproject.toml, and the optional CUDA
extension posttrain._C built from csrc/.

The extension builds where CUDA PyTorch and nvcc are importable at build time (so with --no-build-isolation), or is
forced with POSTTRAIN_BUILD_CUDA=1 (an error if it cannot build) and skipped with POSTTRAIN_BUILD_CUDA=0. A plain
`pip install` on a machine without CUDA skips it; posttrain then runs its Triton and torch implementations.
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

packages = find_packages(include=["posttrain", "posttrain.*"])
packages += ["posttrain.kernels"] + [f"posttrain.kernels.{name}" for name in find_packages("kernels")]


def _default_arch_list(torch) -> str:
    # sm_90 (Hopper) always, plus the installed GPU's own architecture
    archs = {"9.0"}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        archs.add(f"{major}.{minor}")
    return ";".join(sorted(archs))


def cuda_extension() -> dict:
    """setup() keywords for posttrain._C, or {} when it is not to be (or cannot be) built."""
    flag = os.environ.get("POSTTRAIN_BUILD_CUDA")
    if flag == "0":
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if flag == "1":
            raise RuntimeError("POSTTRAIN_BUILD_CUDA=1 needs torch at build time: pip install --no-build-isolation")
        return {}
    if torch.version.cuda is None or CUDA_HOME is None:
        if flag == "1":
            raise RuntimeError(f"POSTTRAIN_BUILD_CUDA=1 needs CUDA PyTorch (have {torch.__version__}) and nvcc")
        return {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _default_arch_list(torch))
    csrc = Path("csrc")
    sources = sorted(str(p) for p in csrc.glob("*.cu")) + [str(csrc / "bindings.cpp")]
    extension = CUDAExtension(
        "posttrain._C",
        sources=sources,
        include_dirs=[str(csrc.resolve())],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(packages=packages, **cuda_extension())
