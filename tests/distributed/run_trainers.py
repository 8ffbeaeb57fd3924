"""Train posttrain's trainers for a few steps on a tiny model under one distributed engine, for test_engines.py.

    accelerate launch --config_file ENGINE.yaml run_trainers.py --engine zero3 --model DIR --out DIR [--trainers ...]
    python run_trainers.py --engine single --model DIR --out DIR     # the reference: one process, the doubled batch

Each trainer runs STEPS optimizer steps with the fused head on, saving a checkpoint at the last one, then a fresh trainer
resumes from that checkpoint for one more step (the reference runs STEPS + 1 steps straight). The main process writes
OUT/<trainer>.json: the logged losses and grad norms, the resumed step's, and what the engine did to the weights
(`sharding`), which the test asserts so that a run cannot pass on plain DDP by accident.

The engines on the CPU (two gloo ranks, use_cpu=True):
- ddp: a MULTI_GPU config (a MULTI_CPU config, or none, runs a single process).
- zero2 / zero3: a DEEPSPEED config (DeepSpeed finds its CPU accelerator).
- fsdp2: accelerate turns FSDP into DDP on the CPU, so the process state is built here (gloo) and marked as GPU-type
  before the trainer's accelerator reads it; the FSDP plugin then shards with fully_shard on a CPU mesh.

GRPO samples with a stand-in for `generate` (the real one runs, then its tokens are replaced by a function of the
prompt and the completion's place in its group), so that two ranks and one process train on the same completions.
"""

import argparse
import functools
import json
import os
import string
import sys
import time
import traceback

import torch

STEPS = 3
PER_DEVICE_BATCH = 2
COMPLETION_LENGTH = 6
NUM_GENERATIONS = 2
TEXT = [f"{a} plus {b} is {a + b}." for a, b in [(1, 2), (13, 4), (7, 7), (20, 5), (3, 9), (11, 11), (6, 2), (9, 0)]]
PAIRS = [(f"{a}+{b}=", f"{a + b}", f"{a + b + 1}") for a, b in [(1, 2), (13, 4), (7, 7), (20, 5), (3, 9), (11, 11),
                                                                (6, 2), (9, 0)]]  # fmt: skip
TRAINERS = ("sft", "dpo", "grpo", "kto", "reward", "rloo", "distillation")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", required=True, choices=("single", "ddp", "zero2", "zero3", "fsdp2"))
    parser.add_argument("--model", required=True, help="a saved causal LM and its tokenizer")
    parser.add_argument("--tied-model", required=True, help="the same with its LM head tied to the embedding")
    parser.add_argument("--out", required=True)
    parser.add_argument("--trainers", nargs="+", default=list(TRAINERS), choices=TRAINERS)
    options = parser.parse_args()
    try:
        if options.engine in ("zero2", "zero3"):
            _without_shared_memory_comm()
        if options.engine == "fsdp2":
            _fsdp_process_state()
        for name in options.trainers:
            _run(name, options)
    except Exception:  # noqa: BLE001
        # a rank that fails must not leave the others waiting in a collective until gloo's timeout
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _without_shared_memory_comm() -> None:
    # DeepSpeed compiles a shared-memory all-reduce with g++ on its first CPU launch (~50 s; it reads no variable to
    # skip it); gloo does the work without it
    import deepspeed.comm.torch

    deepspeed.comm.torch.build_shm_op = lambda: None


def _fsdp_process_state() -> None:
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(cpu=True)
    state.distributed_type = DistributedType.MULTI_GPU


def _engine_args(engine: str) -> dict:
    batch = PER_DEVICE_BATCH * (2 if engine == "single" else 1)
    common = {
        "per_device_train_batch_size": batch, "logging_steps": 1, "learning_rate": 1e-3, "lr_scheduler_type": "constant",
        "seed": 0, "bf16": False, "gradient_checkpointing": False, "report_to": "none", "save_strategy": "steps",
        "save_steps": STEPS, "disable_tqdm": True, "ddp_timeout": 120,
    }  # fmt: skip
    if engine == "fsdp2":
        return {**common, "use_cpu": True, "accelerator_config": {"use_configured_state": True}}
    return {**common, "use_cpu": True}


def _run(name: str, options) -> None:
    out_dir = os.path.join(options.out, name)
    start = time.perf_counter()
    trainer = _trainer(name, options, out_dir, max_steps=STEPS if options.engine != "single" else STEPS + 1)
    built = time.perf_counter()
    trainer.train()
    trained = time.perf_counter()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    result = {
        "losses": [entry["loss"] for entry in logs],
        "grad_norms": [entry.get("grad_norm") for entry in logs],
        "sharding": describe_sharding(trainer),
        "seconds": {"build": built - start, "train": trained - built},
    }
    if options.engine == "zero3" and name == "grpo":
        result["head_gathered_by_itself"] = head_gathered_by_itself(options.model, trainer.accelerator)
    if options.engine != "single":
        checkpoint = os.path.join(out_dir, f"checkpoint-{STEPS}")
        resumed = _trainer(name, options, out_dir, max_steps=STEPS + 1)
        resumed.train(resume_from_checkpoint=checkpoint)
        resumed_logs = [entry for entry in resumed.state.log_history if "loss" in entry]
        result["resumed_steps"] = [entry["step"] for entry in resumed_logs]
        result["resumed_losses"] = [entry["loss"] for entry in resumed_logs]
        result["seconds"]["resume"] = time.perf_counter() - trained
    if trainer.accelerator.is_main_process:
        with open(os.path.join(options.out, f"{name}.json"), "w") as f:
            json.dump(result, f)
    trainer.accelerator.wait_for_everyone()


def _trainer(name: str, options, out_dir: str, max_steps: int):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    import posttrain

    args = _engine_args(options.engine)
    args.update(output_dir=out_dir, max_steps=max_steps)
    if name == "sft":  # the tied head: under ZeRO-3 the embedding's weight, read by the head too
        return posttrain.SFTTrainer(options.tied_model, args=posttrain.SFTConfig(**args),
                                    train_dataset=Dataset.from_dict({"text": TEXT}))  # fmt: skip
    if name == "dpo":  # no reference model: the policy's log-probs before training, in an inference engine
        data = {"prompt": [p for p, _, _ in PAIRS], "chosen": [c for _, c, _ in PAIRS],
                "rejected": [r for _, _, r in PAIRS]}  # fmt: skip
        config = posttrain.DPOConfig(precompute_ref_log_probs=True, **args)
        return posttrain.DPOTrainer(options.model, args=config, train_dataset=Dataset.from_dict(data))
    if name == "kto":  # the reference mixed towards the policy, saved with the checkpoint and read back
        data = {"prompt": [p for p, _, _ in PAIRS], "completion": [c if i % 2 else r for i, (_, c, r) in
                enumerate(PAIRS)], "label": [bool(i % 2) for i in range(len(PAIRS))]}  # fmt: skip
        # "kto" pairs mismatched completions within each process's batch: a different batch split changes its loss
        config = posttrain.KTOConfig(loss_type="apo_zero_unpaired", sync_ref_model=True, ref_model_sync_steps=2,
                                     ref_model_mixup_alpha=0.5, **args)  # fmt: skip
        return posttrain.KTOTrainer(options.model, args=config, train_dataset=Dataset.from_dict(data))
    if name == "reward":
        data = {"prompt": [p for p, _, _ in PAIRS], "chosen": [c for _, c, _ in PAIRS],
                "rejected": [r for _, _, r in PAIRS]}  # fmt: skip
        return posttrain.RewardTrainer(options.model, args=posttrain.RewardConfig(**args),
                                       train_dataset=Dataset.from_dict(data))  # fmt: skip
    prompts = Dataset.from_dict({"prompt": [p for p, _, _ in PAIRS]})
    # the teacher: another model with the same vocabulary (the tied one). Four prompts a step: the resumed 4th step is
    # the middle of the second epoch, where a sampler that missed its epoch would replay the first epoch's order
    if name == "distillation":
        config = posttrain.DistillationConfig(max_completion_length=COMPLETION_LENGTH, beta=0.5, **args)
        trainer = posttrain.DistillationTrainer(options.model, teacher_model=options.tied_model, args=config,
                                                train_dataset=prompts)  # fmt: skip
        return _with_stand_in_generate(trainer, num_generations=1)
    # three optimizer steps per generation: the old log-probs come from the bare policy module, not its engine
    online = getattr(posttrain, f"{name.upper()}Config")(
        num_generations=NUM_GENERATIONS, max_completion_length=COMPLETION_LENGTH, beta=0.04, num_iterations=STEPS,
        **args,
    )  # fmt: skip
    # a model instance, loaded after the config (so partitioned as it loads under ZeRO-3): the reference is its copy
    model = AutoModelForCausalLM.from_pretrained(options.model)
    trainer = getattr(posttrain, f"{name.upper()}Trainer")(model, reward_funcs=vowel_reward, args=online,
                                                           train_dataset=prompts)  # fmt: skip
    return _with_stand_in_generate(trainer, num_generations=NUM_GENERATIONS)


def _with_stand_in_generate(trainer, num_generations: int):
    policy = trainer.accelerator.unwrap_model(trainer.model)
    tokenizer = trainer.processing_class
    letters = torch.tensor(tokenizer(string.ascii_lowercase, add_special_tokens=False)["input_ids"])
    policy.generate = functools.partial(
        _stand_in_generate, policy.generate, tokenizer.pad_token_id, letters, num_generations
    )
    return trainer


def vowel_reward(completions, **kwargs) -> list[float]:
    return [sum(ch in "aeiou" for ch in text) / COMPLETION_LENGTH for text in completions]


def _stand_in_generate(generate, pad_token_id, letters, num_generations, input_ids, attention_mask=None, **kwargs):
    """The real `generate` (whatever the engine does for it runs), then each completion replaced by `letters` (their
    token ids) chosen from its prompt's tokens and its place j among the num_generations completions of that prompt
    (row % G: a group's rows are consecutive and a process's batch holds whole groups)."""
    output = generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    rows = output.shape[0]
    prompts = input_ids.repeat_interleave(rows // input_ids.shape[0], dim=0)
    keys = torch.where(prompts == pad_token_id, 0, prompts).sum(1)
    j = torch.arange(rows, device=output.device) % num_generations
    k = torch.arange(COMPLETION_LENGTH, device=output.device)
    chosen = (keys[:, None] * 7 + j[:, None] * 11 + k[None] * 5) % len(letters)
    return torch.cat([prompts, letters.to(prompts.device, prompts.dtype)[chosen]], dim=1)


def head_gathered_by_itself(model_path: str, accelerator) -> dict:
    """The fused head's own ZeRO-3 gather, on a fresh model in a DeepSpeed engine that has not run a forward yet.

    DeepSpeed 0.19 gathers a parameter read outside its module during a forward it hooks (and registers it with the
    running module); with that discovery switched off, the bare module's log-probs must still equal the engine's:
    the head then finds its weight partitioned and gathers it itself. Returns the weight's status before the call and
    the largest difference."""
    from collections import OrderedDict

    from deepspeed.runtime.zero.parameter_offload import ZeROOrderedDict
    from transformers import AutoModelForCausalLM

    from posttrain.models import add_fused_logprob_head
    from posttrain.models.sharding import prepare_for_inference

    model = AutoModelForCausalLM.from_pretrained(model_path)  # partitioned as it loads
    add_fused_logprob_head(model)
    engine = prepare_for_inference(model, accelerator)
    weight = OrderedDict.__getitem__(model.get_output_embeddings()._parameters, "weight")
    status = weight.ds_status.name
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    discovery = ZeROOrderedDict.__getitem__
    ZeROOrderedDict.__getitem__ = OrderedDict.__getitem__
    try:
        with torch.no_grad():
            bare = model(input_ids=ids, logprob_labels=ids).logprobs
    finally:
        ZeROOrderedDict.__getitem__ = discovery
    with torch.no_grad():
        through_engine = engine(input_ids=ids, logprob_labels=ids).logprobs
    engine.destroy()
    return {"status_before": status, "max_difference": (bare - through_engine).abs().max().item()}


def describe_sharding(trainer) -> dict:
    """How the engine holds the policy's weights on this rank: the wrapper, the number of weights held here and in
    the whole model, DeepSpeed's stage and its optimizer's partition, and for the output layer's weight (the LM head,
    or the reward model's score) its ZeRO-3 status or DTensor placements."""
    wrapped = trainer.model_wrapped
    module = trainer.accelerator.unwrap_model(trainer.model)
    head = module.get_output_embeddings() if trainer.fused_head is not None else module.score
    param = head.weight
    info = {"wrapper": type(wrapped).__name__, "module": type(module).__name__,
            "distributed_type": str(trainer.accelerator.distributed_type).split(".")[-1],
            "num_processes": trainer.accelerator.num_processes}  # fmt: skip
    if hasattr(param, "ds_id"):
        info["ds_status"] = param.ds_status.name
    elif isinstance(param, torch.distributed.tensor.DTensor):
        info["placements"] = [str(p) for p in param.placements]
    sizes = [_local_and_full_numel(p) for p in module.parameters()]
    info.update(model_local_numel=sum(local for local, _ in sizes), model_numel=sum(full for _, full in sizes))
    if trainer.is_deepspeed_enabled:
        info["zero_stage"] = trainer.accelerator.state.deepspeed_plugin.zero_stage
        optimizer = getattr(wrapped, "optimizer", None)
        partitions = getattr(optimizer, "single_partition_of_fp32_groups", None) or getattr(
            optimizer, "fp32_partitioned_groups_flat", None
        )
        if partitions is not None:
            info["optimizer_partition_numel"] = sum(p.numel() for p in partitions)
            info["trainable_numel"] = sum(p.ds_numel if hasattr(p, "ds_id") else p.numel()
                                          for p in module.parameters() if p.requires_grad)  # fmt: skip
    return info


def _local_and_full_numel(param) -> tuple[int, int]:
    if hasattr(param, "ds_id"):
        return param.ds_tensor.numel(), param.ds_numel
    if isinstance(param, torch.distributed.tensor.DTensor):
        return param.to_local().numel(), param.numel()
    return param.numel(), param.numel()


if __name__ == "__main__":
    main()
