"""GRPO with vLLM, against TRL 1.16 step by step: a fake `vllm` (tests/fake_vllm: vLLM 0.30's Python API over a
deterministic CPU engine, which records every call) is installed for both libraries, so that both sample the same
completions, and the sampler's log-probs differ from the trainer's as an inference engine's do; and server mode
against an in-test vLLM server speaking TRL's protocol (HTTP, weights over a gloo group)."""

import copy
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import trl
from datasets import Dataset
from fake_vllm import FAKE_VLLM_DIR, GRPO_BASE, installed, letters_reward, save_tiny_policy, train_grpo
from fake_vllm.server import FakeVLLMServer
from transformers import TrainerCallback

import posttrain
from posttrain.models import tiny_causal_lm
from posttrain.trainers.generation import VLLMColocateGeneration
from posttrain.trainers.generation.vllm_client import VLLMClient
from posttrain.trainers.generation.vllm_engine import _quantization

BASE = {**GRPO_BASE, "max_steps": 3, "use_vllm": True}
TIMING_KEYS = ("step_time", "runtime", "samples_per_second", "steps_per_second")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_policy(tmp_path_factory.mktemp("tiny-vllm"))


@pytest.fixture
def fake_vllm(monkeypatch):
    with installed(monkeypatch) as vllm:
        yield vllm


def train(module, model_dir, tmp_path, **overrides):
    """(trainer, its logged steps, its vLLM engine) after training with the fake engine (3 steps unless overridden)."""
    trainer, logs = train_grpo(module, model_dir, tmp_path / module.__name__, **{**BASE, **overrides})
    generation = trainer.vllm_generation if module is trl else trainer._generation
    return trainer, logs, getattr(generation, "llm", None)


def assert_logs_close(expected, actual):
    """Same keys and values step by step (step 1 to 1e-4 relative, later steps to 1e-3: Adam amplifies the fp32
    summation-order differences of the fused head, as in test_grpo.py)."""
    assert len(expected) == len(actual) > 0
    for i, (want, got) in enumerate(zip(expected, actual)):
        keys = {k for k in want if not k.endswith(TIMING_KEYS)}
        assert keys == {k for k in got if not k.endswith(TIMING_KEYS)}, f"step {i}: logged keys differ"
        for key in sorted(keys):
            assert math.isclose(want[key], got[key], rel_tol=1e-4 if i == 0 else 1e-3, abs_tol=1e-6), (
                f"step {i}, {key}: TRL {want[key]} vs posttrain {got[key]}"
            )


def engine_calls(llm):
    """The engine's calls, with the weight loads merged into the names loaded (TRL loads one tensor per call)."""
    calls = []
    for event in llm.events:
        if event[0] == "load_weights" and calls and calls[-1][0] == "load_weights":
            calls[-1] = ("load_weights", calls[-1][1] + event[1])
        else:
            calls.append(event)
    return calls


# name: GRPOConfig overrides; the importance-sampling bounds sit close to 1 so that the fake engine's mismatch
# (|log p_trainer - log p_sampler| ~ 3e-3 per token) truncates or masks some tokens / sequences
PARITY = {
    "trl_defaults": {},
    "token_truncate_sleep_filters": {
        "vllm_importance_sampling_mode": "token_truncate", "vllm_importance_sampling_clip_min": 0.9995,
        "vllm_importance_sampling_clip_max": 1.0005, "vllm_enable_sleep_mode": True, "temperature": 0.7, "top_k": 20,
        "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.3, "vllm_structured_outputs_regex": "[a-z]+",
        "max_steps": 2,
    },
    "vespo_token_mask_off_policy": {
        "loss_type": "vespo", "vllm_importance_sampling_mode": "token_mask", "vllm_importance_sampling_clip_max": 1.001,
        "off_policy_mask_threshold": 0.0, "num_iterations": 2, "beta": 0.05, "max_steps": 2,
    },
}  # fmt: skip
# name: what the bounds did at some step, seen in the logged (min, max) of the ratio
CUT = {
    "trl_defaults": lambda low, high: 0.95 < low < 1.0 < high < 1.05,
    "token_truncate_sleep_filters": lambda low, high: low == pytest.approx(0.9995) or high == pytest.approx(1.0005),
    "vespo_token_mask_off_policy": lambda low, high: low == 0.0,
}


_TRL_RUNS = {}


def trl_run(name, model_dir, tmp_path):
    """TRL's (logs, engine) for PARITY[name], trained once per module."""
    if (name, model_dir) not in _TRL_RUNS:
        _, logs, llm = train(trl, model_dir, tmp_path, **PARITY[name])
        _TRL_RUNS[name, model_dir] = (logs, llm)
    return _TRL_RUNS[name, model_dir]


@pytest.mark.parametrize("name", list(PARITY))
def test_matches_trl_step_by_step(fake_vllm, model_dir, tmp_path, name):
    """Same logged metrics (sampling/* included), same engine construction, same engine calls in the same order
    (weight loads, prefix-cache resets, sleep / wake-up, generations) and the same sampling parameters as TRL."""
    expected, trl_llm = trl_run(name, model_dir, tmp_path)
    _, actual, llm = train(posttrain, model_dir, tmp_path, **PARITY[name])
    assert_logs_close(expected, actual)
    assert llm.init_kwargs == trl_llm.init_kwargs
    assert engine_calls(llm) == engine_calls(trl_llm)
    assert llm.last_sampling_params == trl_llm.last_sampling_params
    ratios = [(e["sampling/importance_sampling_ratio/min"], e["sampling/importance_sampling_ratio/max"])
              for e in actual if "reward" in e]  # fmt: skip
    assert any(CUT[name](low, high) for low, high in ratios), ratios


def test_trl_default_config_constructs(fake_vllm, model_dir, tmp_path):
    """GRPOConfig(use_vllm=True) with every other field at TRL's default (but bf16, which the CPU lacks): the
    correction is on (sequence_mask, clip_max 3), and the engine is built as TRL builds it."""
    args = posttrain.GRPOConfig(output_dir=str(tmp_path), use_vllm=True, report_to="none", bf16=False)  # CPU
    trainer = posttrain.GRPOTrainer(
        model=model_dir, reward_funcs=letters_reward, args=args, train_dataset=Dataset.from_dict({"prompt": ["a"] * 8})
    )
    llm = trainer._generation.llm
    assert args.vllm_importance_sampling_correction and args.vllm_importance_sampling_mode == "sequence_mask"
    assert llm.init_kwargs["logprobs_mode"] == "processed_logprobs" and llm.init_kwargs["max_num_seqs"] == 8
    assert llm.events == []  # nothing is loaded before the first generation


def test_peft_adapter_is_merged_into_the_engine(fake_vllm, model_dir, tmp_path):
    """The engine gets the base weights with the trained adapter merged in, under the base checkpoint's names, and
    the trained model keeps its adapter unmerged; the same logs and engine calls as TRL."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    _, expected, trl_llm = train(trl, model_dir, tmp_path, peft_config=lora, max_steps=2)
    trainer, actual, llm = train(posttrain, model_dir, tmp_path, peft_config=lora, max_steps=2)
    assert_logs_close(expected, actual)
    assert engine_calls(llm) == engine_calls(trl_llm)
    base_names = [name for name, _ in tiny_causal_lm(seed=0)[0].named_parameters()]
    assert sorted(llm.events[0][1]) == sorted(base_names)

    trainer._sample([[104, 105]] * 2, "train")  # global_step moved: the trained adapter is synced
    policy = trainer.accelerator.unwrap_model(trainer.model)
    assert not any(getattr(module, "merged", False) for module in policy.modules())
    merged = copy.deepcopy(policy).merge_and_unload().state_dict()
    engine = dict(llm.engine.model.named_parameters())
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    initial = tiny_causal_lm(seed=0)[0].state_dict()[q_proj]
    assert not torch.allclose(merged[q_proj], initial, atol=1e-3)  # the adapter trained
    for name, weight in engine.items():
        torch.testing.assert_close(weight, merged[name].to(weight.dtype))


def test_tensor_parallel_size_must_divide_the_processes(fake_vllm, model_dir, tmp_path):
    args = posttrain.GRPOConfig(output_dir=str(tmp_path), **{**BASE, "vllm_tensor_parallel_size": 2})
    with pytest.raises(ValueError, match=r"vllm_tensor_parallel_size \(2\) must divide the number of processes \(1\)"):
        posttrain.GRPOTrainer(model=model_dir, reward_funcs=letters_reward, args=args,
                              train_dataset=Dataset.from_dict({"prompt": ["a"] * 8}))  # fmt: skip


def test_quantization_of_bitsandbytes_policies():
    class Linear4bit(torch.nn.Linear):
        pass

    class Linear8bitLt(torch.nn.Linear):
        pass

    assert _quantization(torch.nn.Sequential(torch.nn.Linear(2, 2))) is None
    assert _quantization(torch.nn.Sequential(Linear4bit(2, 2))) == "bitsandbytes"
    with pytest.raises(ValueError, match="vLLM cannot load 8-bit weights"):
        _quantization(torch.nn.Sequential(Linear8bitLt(2, 2)))


def test_colocate_needs_vllm(model_dir, tmp_path):
    args = posttrain.GRPOConfig(output_dir=str(tmp_path), **BASE)
    with pytest.raises(ImportError, match="use_vllm=True needs vllm, which is not installed"):
        VLLMColocateGeneration(tiny_causal_lm()[0], args, None)


# ---- server mode ----


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server(model_dir):
    server = FakeVLLMServer(model_dir)
    yield server
    server.close()


def test_server_mode_trains_against_the_server(fake_vllm, server, model_dir, tmp_path):
    """Server mode samples what a colocated engine with the same seed samples (the server is asked once per prompt
    for num_generations completions), so it logs what TRL logs in colocate mode; after each optimizer step the
    trained weights reach the server over the weight-transfer group before it generates again."""
    expected, _ = trl_run("trl_defaults", model_dir, tmp_path)
    snapshots = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            snapshots[state.global_step] = {k: v.detach().clone() for k, v in model.named_parameters()}

    trainer, logs, _ = train(
        posttrain, model_dir, tmp_path / "server", callbacks=[Snapshot()], vllm_mode="server",
        vllm_server_base_url=server.url, vllm_group_port=free_port(),
    )  # fmt: skip
    assert_logs_close(expected, logs)

    update = [("POST", "/start_weight_update"), ("POST", "/update_weights"), ("POST", "/finish_weight_update"),
              ("POST", "/reset_prefix_cache"), ("POST", "/v1/completions")]  # fmt: skip
    assert server.requests[-10:] == update + update
    assert ("POST", "/init_weight_transfer_engine") in server.requests
    # the last update carried the weights after optimizer step 2 (step 1's rewards are all equal: no update)
    engine = dict(server.engine.model.named_parameters())
    assert len(server.received) == 3 and sorted(server.received[-1]) == sorted(engine)
    for name, weight in engine.items():
        torch.testing.assert_close(weight, snapshots[2][name])
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(engine[q_proj], tiny_causal_lm(seed=0)[0].state_dict()[q_proj], atol=1e-3)
    trainer._generation.client.close()


def test_server_without_weight_transfer_is_an_error(model_dir):
    server = FakeVLLMServer(model_dir, backend=None)
    try:
        client = VLLMClient(server.url, group_port=free_port(), connection_timeout=5)
        with pytest.raises(RuntimeError, match="weight-transfer-config"):
            client.init_weight_transfer(torch.device("cpu"))
        ids, logprobs = client.generate([[104, 105]], n=3, max_tokens=4, logprobs=0, temperature=1.0)
        assert len(ids) == 3 and [len(lp) for lp in logprobs] == [len(i) for i in ids]
    finally:
        server.close()


def test_no_server_is_a_connection_error():
    with pytest.raises(ConnectionError, match="vllm_server_timeout=0"):
        VLLMClient(f"http://127.0.0.1:{free_port()}", connection_timeout=0)


TWO_PROCESS_SCRIPT = r"""
import os
import sys
from types import SimpleNamespace

import torch
import torch.multiprocessing as mp

SAMPLING = dict(repetition_penalty=1.0, temperature=1.0, top_p=1.0, top_k=0, min_p=None, max_completion_length=6,
                generation_kwargs=None, vllm_structured_outputs_regex=None)


def worker(rank, model_dir, port, url, group_port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from posttrain.trainers.generation import VLLMColocateGeneration, VLLMServerGeneration

    accelerator = Accelerator(cpu=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompts = [[104, 105], [104, 105]] if rank == 0 else [[120, 121, 122], [120, 121, 122]]
    colocate = SimpleNamespace(
        vllm_tensor_parallel_size=2, vllm_enable_sleep_mode=False, vllm_gpu_memory_utilization=0.3,
        vllm_max_model_length=None, per_device_train_batch_size=2, steps_per_generation=1, vllm_model_impl="vllm",
        trust_remote_code=False, **SAMPLING,
    )
    backend = VLLMColocateGeneration(model, colocate, accelerator)
    out = backend.generate(model, prompts, num_generations=2)
    results[rank, "tp"] = (out.ids, out.logprobs, backend.llm.init_kwargs, backend.llm.events)

    server = SimpleNamespace(
        vllm_server_base_url=url, vllm_server_host="0.0.0.0", vllm_server_port=8000, vllm_server_timeout=30,
        vllm_group_port=group_port, vllm_importance_sampling_correction=True, **SAMPLING,
    )
    backend = VLLMServerGeneration(server, accelerator)
    out = backend.generate(model, prompts, num_generations=2)
    results[rank, "server"] = (out.ids, out.logprobs)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.5)
    backend.sync_weights(model, step=1)
    if rank == 0:
        backend.client.close()
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    from fake_vllm.fake_engine import Engine
    from fake_vllm.server import FakeVLLMServer

    model_dir, port, group_port = sys.argv[1:4]
    server = FakeVLLMServer(model_dir)
    results = mp.Manager().dict()
    mp.spawn(worker, args=(model_dir, port, server.url, int(group_port), results), nprocs=2)

    engine = Engine(model_dir, seed=0)  # one engine over all prompts, in rank order
    expected = [s for p in ([104, 105], [120, 121, 122]) for s in engine.sample(p, n=2, max_tokens=6)]
    for rank in (0, 1):
        ids, logprobs, init_kwargs, events = results[rank, "tp"]
        mine = expected[2 * rank : 2 * rank + 2]
        assert ids == [s.token_ids for s in mine], (rank, ids)
        assert logprobs == [s.logprobs for s in mine]
        assert init_kwargs["tensor_parallel_size"] == 2 and init_kwargs["seed"] == 0
        assert init_kwargs["max_num_seqs"] == 4 and events == [("generate", 4)]
        ids, logprobs = results[rank, "server"]  # the server samples 2 of each distinct prompt: the same draws
        assert ids == [s.token_ids for s in mine], (rank, ids)
        assert logprobs == [s.logprobs for s in mine]  # JSON carries floats exactly
    assert [path for _, path in server.requests].count("/v1/completions") == 1 and len(server.received) == 1
    scaled = {name: 1.5 * weight for name, weight in Engine(model_dir).model.named_parameters()}
    assert all(torch.equal(w, scaled[n]) for n, w in server.engine.model.named_parameters())
    server.close()
    print("two-process checks passed")
"""


def test_two_processes_share_engines_as_trl(model_dir, tmp_path):
    """Two processes (gloo): with vllm_tensor_parallel_size=2 they run one engine (same seed), each generating the
    group's prompts and keeping its own share; in server mode the main process asks the server once for every
    process's prompts and hands out the shares, and both processes take part in the weight sync."""
    script = tmp_path / "two_processes.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    paths = [str(FAKE_VLLM_DIR), str(FAKE_VLLM_DIR.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    result = subprocess.run(
        [sys.executable, str(script), model_dir, str(free_port()), str(free_port())], env=env, cwd=tmp_path,
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0 and "checks passed" in result.stdout, result.stderr[-3000:]
