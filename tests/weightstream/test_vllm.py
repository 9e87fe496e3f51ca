"""The vLLM integration: entry point, idempotent registration, extra-config validation, the loader."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.weightstream.conftest import random_tensor, write_checkpoint
from weightstream import vllm_plugin
from weightstream.vllm_plugin import parse_extra_config

ROOT = Path(__file__).resolve().parents[2]


def test_entry_point_is_declared_and_harmless_without_vllm():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    target = project["project"]["entry-points"]["vllm.general_plugins"]["liftoff_weights"]
    module, _, name = target.partition(":")
    register = getattr(importlib.import_module(module), name)
    assert register is vllm_plugin.register
    register()  # vLLM calls it in every process; where vllm is absent it must simply do nothing
    register()


def test_extra_config_is_validated():
    assert parse_extra_config({"url": "s3://b/m/", "concurrency": 32, "path_style": True}) == {
        "url": "s3://b/m/",
        "concurrency": 32,
        "path_style": True,
    }
    assert parse_extra_config(None) == {}
    with pytest.raises(ValueError, match="unknown model_loader_extra_config key"):
        parse_extra_config({"uri": "s3://b/m/"})
    with pytest.raises(ValueError, match=r"\['concurrency'\] has the wrong type"):
        parse_extra_config({"concurrency": "32"})
    with pytest.raises(ValueError, match="must be a JSON object"):
        parse_extra_config(["s3://b/m/"])


class TinyVllmModel(torch.nn.Module):
    """vLLM's model interface as the loader uses it: load_weights(iterable of (name, tensor)) -> names loaded."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(64, 32))
        self.b = torch.nn.Parameter(torch.zeros(32))

    def load_weights(self, weights) -> set[str]:
        loaded = set()
        for name, tensor in weights:
            getattr(self, name).data.copy_(tensor)
            loaded.add(name)
        return loaded


def test_loader_registered_once_and_streams_into_the_model(tmp_path, s3_prefix):
    pytest.importorskip("vllm")
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader

    from weightstream.vllm_loader import LiftoffModelLoader

    generator = torch.Generator().manual_seed(60)
    tensors = {"a": random_tensor((64, 32), torch.float32, generator), "b": random_tensor((32,), torch.float32, generator)}
    write_checkpoint(tmp_path / "weights", tensors)
    s3_prefix.upload(tmp_path / "weights")
    vllm_plugin.register()
    vllm_plugin.register()
    config = LoadConfig(load_format="liftoff", model_loader_extra_config={"url": s3_prefix.url(), "device": "cpu"})
    loader = get_model_loader(config)
    assert isinstance(loader, LiftoffModelLoader)
    model_config = SimpleNamespace(model=str(tmp_path), quantization=None, revision=None)
    loader.download_model(model_config)
    model = TinyVllmModel()
    loader.load_weights(model, model_config)
    assert torch.equal(model.a.data.view(torch.uint8), tensors["a"].view(torch.uint8))
    write_checkpoint(tmp_path / "partial", {"a": tensors["a"]})
    s3_prefix.upload(tmp_path / "partial")
    partial = get_model_loader(LoadConfig(load_format="liftoff", model_loader_extra_config={"url": str(tmp_path / "partial")}))
    with pytest.raises(ValueError, match=r"weights not initialized .*\['b'\]"):
        partial.load_weights(TinyVllmModel(), model_config)
