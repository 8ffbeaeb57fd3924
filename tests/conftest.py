"""Test set-up shared by the whole suite.

Without CUDA, the Triton kernels run in Triton's interpreter. TRITON_INTERPRET must be set before anything imports
triton, so this happens at the top of the root conftest, before any test module (or posttrain) is collected.
"""

import os
import shutil
import subprocess


def _has_cuda() -> bool:
    # torch.cuda would import torch (and maybe triton) first; ask the driver instead
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# posttrain drops the checkout's root from sys.path (`python -m pytest` puts it there), whose kernels/ would shadow the
# PyPI package `kernels` that transformers imports: first, as a test module may import transformers before posttrain
import posttrain  # noqa: E402, F401

if os.environ.get("PYTEST_XDIST_WORKER") and not torch.cuda.is_available():
    # xdist runs one worker per core: intra-op threads would only oversubscribe them (tiny matrices, OpenMP spinning)
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Test folders whose tensors feed the Triton kernels directly
KERNEL_TEST_DIRS = ("ops", "kernels")


@pytest.fixture(autouse=True)
def _tensors_where_triton_runs(request):
    """Without CUDA, Triton interprets the kernels on CPU tensors; with CUDA it compiles them for the GPU, so the kernel
    tests then build their tensors there (torch's default device) and check the compiled kernels in float32."""
    if not torch.cuda.is_available() or request.node.path.parent.name not in KERNEL_TEST_DIRS:
        yield
        return
    with torch.device("cuda"):
        yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Qwen2 causal LM and its byte-level tokenizer saved to a directory (loadable with from_pretrained)."""
    from posttrain.models import tiny_causal_lm

    path = tmp_path_factory.mktemp("tiny-qwen2")
    model, tokenizer = tiny_causal_lm(seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
