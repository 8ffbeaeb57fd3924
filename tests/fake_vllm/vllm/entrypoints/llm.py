"""vllm.LLM as the trainers use it: the constructor, generate, sleep / wake_up, reset_prefix_cache, and the model
runner's load_weights (llm.llm_engine.model_executor.driver_worker.model_runner.model). Every call is recorded in
`events`, so that tests compare what TRL and posttrain do."""

from types import SimpleNamespace

from fake_vllm.fake_engine import Engine

from ..logprobs import Logprob
from ..outputs import CompletionOutput, RequestOutput
from ..sampling_params import SamplingParams

ENGINE_ARGS = {
    "tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "max_num_seqs", "enable_sleep_mode",
    "model_impl", "distributed_executor_backend", "seed", "max_num_batched_tokens", "logprobs_mode", "quantization",
    "trust_remote_code", "dtype",
}  # fmt: skip


class LLM:
    def __init__(self, model: str, **engine_args):
        unknown = set(engine_args) - ENGINE_ARGS
        if unknown:
            raise TypeError(f"fake vLLM: unexpected engine arguments {sorted(unknown)}")
        self.init_kwargs = {"model": model, **engine_args}
        self.events = []
        self.asleep = set()
        self.engine = Engine(
            model, seed=engine_args.get("seed", 0),
            processed_logprobs=engine_args.get("logprobs_mode", "raw_logprobs") == "processed_logprobs",
        )  # fmt: skip
        runner = SimpleNamespace(model=SimpleNamespace(load_weights=self._load_weights))
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner)),
            model_config=SimpleNamespace(max_model_len=engine_args.get("max_model_len") or 1024),
        )

    def _load_weights(self, weights):
        if "weights" in self.asleep:
            raise RuntimeError("fake vLLM: load_weights while the weights sleep (wake_up(tags=['weights']) first)")
        loaded = self.engine.load_weights(weights)
        self.events.append(("load_weights", tuple(self.engine.loaded[-1])))
        return loaded

    def generate(self, prompts, sampling_params: SamplingParams | None = None, use_tqdm: bool = True):
        if self.asleep:
            raise RuntimeError(f"fake vLLM: generate while {sorted(self.asleep)} sleep")
        params = sampling_params or SamplingParams()
        self.events.append(("generate", len(prompts)))
        outputs = []
        for i, prompt in enumerate(prompts):
            samples = self.engine.sample(
                prompt["prompt_token_ids"], n=params.n, temperature=params.temperature, top_p=params.top_p,
                top_k=params.top_k, min_p=params.min_p, repetition_penalty=params.repetition_penalty,
                max_tokens=params.max_tokens, ignore_eos=params.ignore_eos,
            )  # fmt: skip
            completions = [
                CompletionOutput(
                    index=j, text="", token_ids=s.token_ids, cumulative_logprob=sum(s.logprobs),
                    logprobs=None if params.logprobs is None else [
                        {t: Logprob(lp, rank)} for t, lp, rank in zip(s.token_ids, s.logprobs, s.ranks)
                    ],
                    finish_reason=s.finish_reason,
                )
                for j, s in enumerate(samples)
            ]  # fmt: skip
            outputs.append(RequestOutput(str(i), None, list(prompt["prompt_token_ids"]), completions))
        self.last_sampling_params = params
        return outputs

    def sleep(self, level: int = 1):
        self.events.append(("sleep", level))
        self.asleep = {"weights", "kv_cache"}
        if level == 2:
            self.engine.discard_weights()

    def wake_up(self, tags: list[str] | None = None):
        self.events.append(("wake_up", None if tags is None else tuple(tags)))
        self.asleep -= {"weights", "kv_cache"} if tags is None else set(tags)

    def reset_prefix_cache(self):
        self.events.append(("reset_prefix_cache",))
        return True
