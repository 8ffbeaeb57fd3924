"""examples/accelerate/*.yaml are accelerate configs that `accelerate launch --config_file` reads as they stand (the
engines themselves run from them in test_engines.py, made to fit two CPU processes)."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples" / "accelerate"
ENGINES = {"ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp2": "FSDP"}


@pytest.mark.parametrize("engine", ENGINES)
def test_example_config_loads_as_accelerate_reads_it(engine):
    config = load_config_from_file(str(EXAMPLES / f"{engine}.yaml"))
    assert str(config.distributed_type).split(".")[-1] == ENGINES[engine]
    assert config.mixed_precision == "bf16" and not config.use_cpu
    if engine.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(engine[-1])
    if engine == "zero3":
        assert config.deepspeed_config["zero3_init_flag"] and config.deepspeed_config["zero3_save_16bit_model"]
    if engine == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
