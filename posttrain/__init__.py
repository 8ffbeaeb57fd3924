"""posttrain: TRL-compatible post-training with fused kernels on the hot paths.

    from posttrain import GRPOTrainer, GRPOConfig   # as from trl, same arguments and numbers
"""

import importlib

from posttrain._compat import unshadow_pypi_kernels

unshadow_pypi_kernels()

__version__ = "0.1.0"

# Imported on first use: `import posttrain` (e.g. for its ops) does not pay for transformers' Trainer.
_LAZY = {
    "SFTConfig": "posttrain.configs.sft",
    "DPOConfig": "posttrain.configs.dpo",
    "GRPOConfig": "posttrain.configs.grpo",
    "RLOOConfig": "posttrain.configs.rloo",
    "KTOConfig": "posttrain.configs.kto",
    "RewardConfig": "posttrain.configs.reward",
    "DistillationConfig": "posttrain.configs.distillation",
    "SFTTrainer": "posttrain.trainers.sft",
    "DPOTrainer": "posttrain.trainers.dpo",
    "GRPOTrainer": "posttrain.trainers.grpo",
    "RLOOTrainer": "posttrain.trainers.rloo",
    "KTOTrainer": "posttrain.trainers.kto",
    "RewardTrainer": "posttrain.trainers.reward",
    "DistillationTrainer": "posttrain.trainers.distillation",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'posttrain' has no attribute {name!r}")
