"""Every trainer under every engine accelerate offers, with two CPU processes (gloo) and the fused head on.

For each engine (DDP, DeepSpeed ZeRO-2, ZeRO-3, FSDP2) one launch of run_trainers.py trains SFT, DPO, GRPO, KTO,
Reward, RLOO and Distillation for 3 steps on a tiny model, saves a checkpoint and resumes it for a 4th step. Against
one process with the doubled batch (the same samples per optimizer step) the test checks the logged losses and
gradient norms of every step, the resumed step included, the weights the checkpoint saved whole (and KTO's synced
reference), and that the engine really sharded what it shards: otherwise a run could pass on plain DDP. Under ZeRO-3
the fused head also gathers a partitioned LM head itself where DeepSpeed does not
(run_trainers.head_gathered_by_itself).

The accelerate configs are examples/accelerate/*.yaml made to run on the CPU: 2 processes, no mixed precision, and
for ZeRO-3 a DeepSpeed config with stage3_param_persistence_threshold 0 (its default keeps a tiny model's weights
whole). Marked `distributed`: `-m 'not slow and not distributed'` skips them locally.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from filelock import FileLock
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from posttrain.models import tiny_causal_lm

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent.parent / "examples" / "accelerate"
TRAINERS = ("sft", "dpo", "grpo", "kto", "reward", "rloo", "distillation")
STEPS = 3
# One launch trains the seven trainers twice (3 steps, then the resumed 4th): ~1.5 minutes on 2 idle cores
LAUNCH_TIMEOUT = 480
# fp32 on both sides; the two runs differ in the order of the gradient sums (two ranks' all-reduce or
# reduce-scatter against one process's batch), which Adam carries into the next steps. Measured: every loss and
# gradient norm within 2.4e-6 relative over the 4 steps (GRPO's first loss, ~4e-8, identical), while one rank's half
# of the batch trained alone (a gradient never reduced) moves every trainer's step-2 loss by 1.2e-2 to 4.7e-2.
RTOL, ATOL = 1e-4, 1e-6
# The saved weights after 3 Adam steps of lr 1e-3: measured within 6e-6 of one process's (Adam scales a near-zero
# gradient's rounding difference up to a sizeable step), where a wrong or missing reduction moves them by ~lr
WEIGHTS_ATOL = 1e-4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _environment() -> dict:
    # the CPU recipe everywhere, a GPU machine included; the fused kernels run in Triton's interpreter
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}


def _run(command: list[str], log: Path) -> None:
    """Run `command` under `timeout` (which stops the launcher and its ranks together), its output in `log`."""
    with open(log, "w") as out:
        result = subprocess.run(["timeout", "-k", "10", str(LAUNCH_TIMEOUT), *command], stdout=out,
                                stderr=subprocess.STDOUT, env=_environment(), check=False)  # fmt: skip
    if result.returncode != 0:
        status = "timed out" if result.returncode in (124, 137) else f"exit code {result.returncode}"
        pytest.fail(f"{' '.join(command[:6])} ... {status}; its output ends with:\n{log.read_text()[-6000:]}")


def _shared_dir(tmp_path_factory, worker_id: str) -> Path:
    # the session's directory, one for all xdist workers
    base = tmp_path_factory.getbasetemp()
    return base.parent if worker_id != "master" else base


@pytest.fixture(scope="session")
def models(tmp_path_factory, worker_id) -> dict[str, Path]:
    root = _shared_dir(tmp_path_factory, worker_id) / "distributed-models"
    paths = {"untied": root / "untied", "tied": root / "tied"}
    with FileLock(str(root) + ".lock"):
        if not (root / "done").exists():
            for name, path in paths.items():
                model, tokenizer = tiny_causal_lm(seed=0, tie_word_embeddings=name == "tied")
                model.save_pretrained(path)
                tokenizer.save_pretrained(path)
            (root / "done").touch()
    return paths


def _script_args(engine: str, models: dict[str, Path], out: Path) -> list[str]:
    return [str(HERE / "run_trainers.py"), "--engine", engine, "--model", str(models["untied"]),
            "--tied-model", str(models["tied"]), "--out", str(out)]  # fmt: skip


@pytest.fixture(scope="session")
def reference(models, tmp_path_factory, worker_id) -> Path:
    """One process, the doubled batch, STEPS + 1 steps straight (computed once for all workers)."""
    out = _shared_dir(tmp_path_factory, worker_id) / "distributed-reference"
    with FileLock(str(out) + ".lock"):
        if not (out / "done").exists():
            out.mkdir(exist_ok=True)
            _run([sys.executable, *_script_args("single", models, out)], out / "log.txt")
            (out / "done").touch()
    return out


def cpu_config(engine: str, folder: Path) -> Path:
    """examples/accelerate/<engine>.yaml for two CPU processes: no mixed precision (fp32 comparisons); DeepSpeed's
    options in a config file that also makes ZeRO-3 shard a tiny model and save it whole."""
    config = yaml.safe_load((EXAMPLES / f"{engine}.yaml").read_text())
    config.update(num_processes=2, num_machines=1, mixed_precision="no")
    config.pop("gpu_ids", None)
    if config["distributed_type"] == "DEEPSPEED":
        options = config.pop("deepspeed_config")
        zero = {"stage": options["zero_stage"]}
        if options["zero_stage"] == 3:
            zero.update(stage3_param_persistence_threshold=0,
                        stage3_gather_16bit_weights_on_model_save=options["zero3_save_16bit_model"])  # fmt: skip
        deepspeed = {"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                     "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}  # fmt: skip
        (folder / "deepspeed.json").write_text(json.dumps(deepspeed))
        config["deepspeed_config"] = {"deepspeed_config_file": str(folder / "deepspeed.json"),
                                      "zero3_init_flag": options.get("zero3_init_flag", False)}  # fmt: skip
        del config["mixed_precision"]  # accelerate refuses it next to a DeepSpeed config file (whose default is fp32)
    path = folder / f"{engine}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _launch(engine: str, models, folder: Path) -> Path:
    out = folder / "out"
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
               str(cpu_config(engine, folder)), "--main_process_port", str(_free_port()),
               *_script_args(engine, models, out)]  # fmt: skip
    _run(command, folder / "log.txt")
    return out


def _close(actual: float, expected: float) -> bool:
    return math.isclose(actual, expected, rel_tol=RTOL, abs_tol=ATOL)


def _compare_logs(trainer: str, run: dict, reference: dict) -> list[str]:
    problems = []
    pairs = [("loss", run["losses"], reference["losses"][:STEPS]),
             ("grad_norm", run["grad_norms"], reference["grad_norms"][:STEPS]),
             ("resumed loss", run["resumed_losses"][STEPS:], reference["losses"][STEPS:])]  # fmt: skip
    for name, actual, expected in pairs:
        if len(actual) != len(expected) or not all(map(_close, actual, expected)):
            problems.append(f"{trainer}: {name} per step {actual}, one process {expected}")
    if run["resumed_steps"] != list(range(1, STEPS + 2)):
        problems.append(f"{trainer}: the resumed run logged steps {run['resumed_steps']}")
    return problems


def _compare_saved(trainer: str, checkpoint: Path, reference: Path) -> list[str]:
    """The checkpoint's model reloaded with from_pretrained (and KTO's synced reference, saved by posttrain) against
    one process's."""
    architecture = AutoModelForSequenceClassification if trainer == "reward" else AutoModelForCausalLM
    saved = {"model": architecture.from_pretrained(checkpoint).state_dict()}
    expected = {"model": architecture.from_pretrained(reference).state_dict()}
    if trainer == "kto":
        saved["reference"], expected["reference"] = (load_file(path / "ref_model.safetensors")
                                                      for path in (checkpoint, reference))  # fmt: skip
    problems = []
    for name, state in saved.items():
        keys = state.keys() ^ expected[name].keys()
        if keys:
            problems.append(f"{trainer}: the saved {name} has {sorted(keys)} on one side only")
            continue
        worst = max(_max_difference(state[key], expected[name][key]) for key in state)
        if worst > WEIGHTS_ATOL:
            problems.append(f"{trainer}: the saved {name} differs from one process's by up to {worst:.3g}")
    return problems


def _max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.shape == b.shape else math.inf


def _check_sharding(engine: str, trainer: str, info: dict) -> list[str]:
    """What the engine must have done to the weights (`describe_sharding` in run_trainers.py)."""
    expected = {"num_processes": 2}
    if engine == "ddp":
        expected.update(wrapper="DistributedDataParallel", distributed_type="MULTI_CPU")
    elif engine in ("zero2", "zero3"):
        expected.update(wrapper="DeepSpeedEngine", distributed_type="DEEPSPEED", zero_stage=int(engine[-1]))
    else:
        expected.update(distributed_type="FSDP", placements=["S(0)"])
    problems = [f"{trainer}: {key} is {info.get(key)!r}, expected {value!r}" for key, value in expected.items()
                if info.get(key) != value]  # fmt: skip
    whole = info["model_local_numel"] == info["model_numel"]
    if whole != (engine in ("ddp", "zero2")):
        problems.append(f"{trainer}: this rank holds {info['model_local_numel']} of {info['model_numel']} weights")
    if engine == "zero3" and info.get("ds_status") != "NOT_AVAILABLE":
        problems.append(f"{trainer}: the head's weight is {info.get('ds_status')} between steps, not partitioned")
    if engine in ("zero2", "zero3") and not info["optimizer_partition_numel"] < info["trainable_numel"]:
        problems.append(f"{trainer}: the optimizer holds {info['optimizer_partition_numel']} of "
                        f"{info['trainable_numel']} trainable weights on this rank")  # fmt: skip
    return problems


@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3", "fsdp2"])
def test_two_processes_match_one_with_the_doubled_batch(engine, models, reference, tmp_path):
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is a dev dependency: pip install deepspeed")
    out = _launch(engine, models, tmp_path)
    problems = []
    for trainer in TRAINERS:
        run = json.loads((out / f"{trainer}.json").read_text())
        expected = json.loads((reference / f"{trainer}.json").read_text())
        problems += _compare_logs(trainer, run, expected)
        problems += _compare_saved(trainer, out / trainer / f"checkpoint-{STEPS}",
                                   reference / trainer / f"checkpoint-{STEPS}")  # fmt: skip
        problems += _check_sharding(engine, trainer, run["sharding"])
    if engine == "zero3":
        check = json.loads((out / "grpo.json").read_text())["head_gathered_by_itself"]
        if check["status_before"] != "NOT_AVAILABLE" or not check["max_difference"] <= ATOL:
            problems.append(f"the head's own gather of a partitioned weight: {check}")
    assert not problems, f"{engine}:\n" + "\n".join(problems)
