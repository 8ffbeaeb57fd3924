"""posttrain.models.sharding in one process: which parameters ZeRO-3 would gather, the whole-tensor state dict of a
(tied) model and its reload, and the inference copy of a DeepSpeed config. The engines themselves run in
test_engines.py."""

import copy
from types import SimpleNamespace

import pytest
import torch

from posttrain.models import tiny_causal_lm
from posttrain.models.sharding import (
    _inference_config,
    full_state_dict,
    full_tensor,
    gathered,
    load_full_state_dict,
    zero3_partitioned,
)


def _zero3_param(ds_id, status):
    param = torch.nn.Parameter(torch.empty(0))
    param.ds_id, param.ds_status = ds_id, status
    return param


def test_only_partitioned_zero3_parameters_are_gathered_once_each():
    ZeroParamStatus = pytest.importorskip("deepspeed.runtime.zero.partition_parameters").ZeroParamStatus
    partitioned = _zero3_param(1, ZeroParamStatus.NOT_AVAILABLE)
    in_flight = _zero3_param(2, ZeroParamStatus.INFLIGHT)
    available = _zero3_param(3, ZeroParamStatus.AVAILABLE)  # e.g. a tied embedding its own module holds gathered
    plain = torch.nn.Parameter(torch.randn(2))
    selected = zero3_partitioned([partitioned, None, plain, available, in_flight, partitioned])
    assert [p.ds_id for p in selected] == [1, 2]


def test_gathered_and_full_tensor_leave_plain_tensors_alone():
    weight = torch.randn(3, 2)
    with gathered(weight, None):
        assert full_tensor(weight) is weight
    assert full_tensor(None) is None


def test_full_state_dict_reloads_into_a_tied_model_from_either_name():
    model, _ = tiny_causal_lm(seed=0)  # lm_head.weight is embed_tokens.weight
    other, _ = tiny_causal_lm(seed=1)
    state = full_state_dict(model)
    assert state["lm_head.weight"].data_ptr() != state["model.embed_tokens.weight"].data_ptr()  # copies, on the CPU
    del state["lm_head.weight"]  # a file written by safetensors' save_model keeps one name of a tied pair
    load_full_state_dict(other, state)
    for (name, expected), actual in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=name)
    assert other.lm_head.weight is other.model.embed_tokens.weight


def test_reloading_a_state_dict_without_a_weight_names_it():
    model, _ = tiny_causal_lm(seed=0)
    state = full_state_dict(model)
    del state["model.norm.weight"]
    with pytest.raises(KeyError, match=r"no entry for \['model.norm.weight'\]"):
        load_full_state_dict(model, state)


def _accelerator(config):
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)))


@pytest.mark.parametrize("stage", [1, 2])
def test_inference_config_drops_the_optimizer_and_holds_stages_1_2_whole(stage):
    config = {
        "zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu"}, "reduce_bucket_size": "auto"},
        "optimizer": {"type": "AdamW"},
        "scheduler": {"type": "WarmupLR"},
        "bf16": {"enabled": True},
    }
    original = copy.deepcopy(config)
    model, _ = tiny_causal_lm(seed=0)
    result = _inference_config(model, _accelerator(config))
    assert result == {"zero_optimization": {"stage": 0, "reduce_bucket_size": 64 * 64}, "bf16": {"enabled": True}}
    assert config == original


def test_inference_config_keeps_zero3_and_fills_only_the_auto_sizes():
    config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                    "stage3_prefetch_bucket_size": "auto", "reduce_bucket_size": "auto"}}  # fmt: skip
    model, _ = tiny_causal_lm(seed=0)  # hidden size 64
    zero = _inference_config(model, _accelerator(config))["zero_optimization"]
    assert zero == {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 3686,
                    "reduce_bucket_size": 4096}  # fmt: skip
