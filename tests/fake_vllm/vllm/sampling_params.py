from dataclasses import dataclass


@dataclass
class StructuredOutputsParams:
    regex: str | None = None
    json: dict | str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


@dataclass
class SamplingParams:
    """vLLM's SamplingParams fields that the trainers set (an unknown field is a TypeError, as in vLLM)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    logprobs: int | None = None
    seed: int | None = None
    ignore_eos: bool = False
    structured_outputs: StructuredOutputsParams | None = None
