import pytest
import torch


@pytest.fixture(autouse=True)
def _tensors_where_triton_runs():
    """Without CUDA, Triton interprets the kernels on CPU tensors; with CUDA it compiles them for the GPU, so the same
    tests then build their tensors there (torch's default device) and check the compiled kernels in float32."""
    if not torch.cuda.is_available():
        yield
        return
    with torch.device("cuda"):
        yield
