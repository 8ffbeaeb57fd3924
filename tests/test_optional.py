"""Optional dependencies are checked in one place (posttrain._optional) and named with the extra that installs them."""

import importlib.util

import pytest

from posttrain._optional import is_available, require
from posttrain.models.loading import check_local_path, create_model


def test_a_missing_module_names_the_feature_and_the_extra(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    assert not is_available("vllm") and is_available("torch")
    with pytest.raises(ImportError, match=r"use_vllm=True needs vllm, which is not installed: pip install 'posttrain\[vllm\]'"):
        require("vllm", "use_vllm=True")
    require("torch", "anything")  # installed: no error


def test_a_local_model_path_that_does_not_exist_says_so(tmp_path):
    with pytest.raises(OSError, match="no such directory"):
        create_model(str(tmp_path / "missing" / "model"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(OSError, match="is a file, not a directory"):
        check_local_path(str(tmp_path / "config.json"), "model")
    check_local_path("Qwen/Qwen2-0.5B", "model")  # a hub id: left to the hub
