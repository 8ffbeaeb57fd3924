"""A fake `vllm` for the tests: the part of vLLM 0.30's Python API that TRL 1.16 and posttrain call, backed by a
deterministic CPU engine (fake_engine). Installed for a test by putting tests/fake_vllm on sys.path."""

__version__ = "0.30.0"

from .entrypoints.llm import LLM
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
