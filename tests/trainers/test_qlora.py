"""QLoRA on the CPU: a 4-bit NF4 base (bitsandbytes quantizes on the CPU), LoRA adapters trained in bf16 as TRL does,
the fused head reading the unquantized LM head. Same logged losses as TRL 1.16 with the same quantized model."""

import math
import warnings

import pytest
import torch
import trl
from datasets import Dataset

import posttrain

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

COMMON = dict(
    max_steps=2, logging_steps=1, per_device_train_batch_size=2, learning_rate=1e-3, seed=0, bf16=False,
    gradient_checkpointing=False, report_to="none", save_strategy="no", disable_tqdm=True,
)  # fmt: skip
# bf16 adapters: the two libraries run the same bf16 arithmetic in the same order, but the fused head sums the fp32
# log-softmax in another order than TRL's chunked head; step 2 inherits step 1's bf16-rounded update
RTOL = 2e-3


def _reward(completions, **kwargs):
    return [float(sum(map(ord, c)) % 17) for c in completions]


CASES = {
    "SFT": (lambda: Dataset.from_dict({"text": [f"{a} plus {a} is {2 * a}." for a in range(4)]}), {}, {}),
    "DPO": (lambda: Dataset.from_dict({"prompt": ["2+2=", "x"], "chosen": ["4", "y z"], "rejected": ["5", "q"]}),
            {}, {}),
    "GRPO": (lambda: Dataset.from_dict({"prompt": ["hello", "abc"]}),
             {"num_generations": 2, "max_completion_length": 4}, {"reward_funcs": _reward}),
}  # fmt: skip


def _quantization():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def _run(library, kind, model_dir, tmp_path):
    dataset, config, kwargs = CASES[kind]
    extra = {"use_fused_kernels": True} if library is posttrain else {}
    args = getattr(library, f"{kind}Config")(output_dir=str(tmp_path), **COMMON, **config, **extra,
                                             model_init_kwargs={"dtype": "float32"})  # fmt: skip
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = getattr(library, f"{kind}Trainer")(
        model_dir, args=args, train_dataset=dataset(), peft_config=lora, quantization_config=_quantization(), **kwargs
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return trainer, before, logs


@pytest.mark.parametrize("kind", list(CASES))
def test_qlora_trains_the_adapters_only_and_matches_trl(kind, tiny_model_dir, tmp_path):
    trainer, before, logs = _run(posttrain, kind, tiny_model_dir, tmp_path / "posttrain")
    _, _, expected = _run(trl, kind, tiny_model_dir, tmp_path / "trl")
    model = trainer.model
    assert model.is_loaded_in_4bit
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    after = dict(model.named_parameters())
    trained = {name for name, p in after.items() if p.requires_grad}
    assert trained and all("lora_" in name for name in trained)
    assert all(after[name].dtype == torch.bfloat16 for name in trained)  # QLoRA's adapters train in bf16
    assert any(not torch.equal(after[name].detach(), before[name]) for name in trained)
    for name, param in after.items():
        if name not in trained:
            assert torch.equal(param.detach(), before[name]), f"frozen {name} changed"
    assert len(logs) == len(expected) == 2
    for ours, theirs in zip(logs, expected):
        assert math.isclose(ours["loss"], theirs["loss"], rel_tol=RTOL, abs_tol=1e-5), (ours["loss"], theirs["loss"])
