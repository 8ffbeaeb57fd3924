"""posttrain's optional dependencies, checked in one place: whether one is installed, and a clear error naming the
feature that needs it and the extra that installs it."""

import importlib.util

# module -> the pip requirement that installs it
EXTRAS = {
    "peft": "posttrain[peft]",
    "vllm": "posttrain[vllm]",
    "bitsandbytes": "posttrain[qlora]",
    "flash_attn": "posttrain[flash]",
    "liger_kernel": "posttrain[bench]",
    "deepspeed": "deepspeed",
}


def is_available(module: str) -> bool:
    """Whether `module` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def require(module: str, feature: str) -> None:
    """Raise ImportError when `feature` (what the user asked for, e.g. "use_vllm=True") needs `module` and it is not
    installed.

    Example:
        >>> require("peft", "peft_config")   # ImportError: peft_config needs peft, which is not installed: ...
    """
    if not is_available(module):
        install = EXTRAS.get(module, module)
        raise ImportError(f"{feature} needs {module}, which is not installed: pip install '{install}'")
