"""The vLLM model loader for load format "liftoff" (vLLM's BaseModelLoader interface; imports vLLM).

The checkpoint URL and tunables come from `--model-loader-extra-config`
(keys below); `--model` is a local directory with config.json and the tokenizer
(see weightstream.vllm_plugin.fetch_config_dir). Tensors are streamed straight
into `model.load_weights` in file order, on the worker's GPU through the pinned
ring when CUDA is available, with memory held ahead of the model bounded by
pool_bytes. Each yielded tensor owns its memory, so vLLM's layerwise loading,
which holds a layer's weights until the layer is complete, stays correct.

Tensor parallelism: vLLM hands every rank full checkpoint tensors and each
parameter's weight_loader narrows them, so each rank streams the whole
checkpoint (TP=N reads it N times, as vLLM's own loaders do); per-rank slicing
needs model-specific split rules: see weightstream.tp for the API that does it.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

import weightstream
from weightstream.vllm_plugin import parse_extra_config

log = logging.getLogger(__name__)


class LiftoffModelLoader(BaseModelLoader):
    """Streams safetensors from s3://, file:// or a path straight into the model (no disk round trip)."""

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        self.settings = parse_extra_config(load_config.model_loader_extra_config)

    def _url(self, model_config: ModelConfig) -> str:
        url = self.settings.get("url")
        if url:
            return url
        if os.path.isdir(model_config.model):
            return model_config.model
        raise ValueError(
            "load format liftoff needs the checkpoint's URL: pass --model-loader-extra-config "
            '\'{"url": "s3://bucket/prefix/"}\' with a local config directory as --model'
        )

    def _device(self) -> str:
        device = self.settings.get("device")
        if device:
            return device
        return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"

    def _open(self, model_config: ModelConfig) -> weightstream.Checkpoint:
        options = {k: v for k, v in self.settings.items() if k not in ("url", "device")}
        return weightstream.open(self._url(model_config), **options)

    def download_model(self, model_config: ModelConfig) -> None:
        """Nothing is downloaded ahead: open the checkpoint so a wrong URL or a corrupt header fails now."""
        with self._open(model_config):
            pass

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        """Stream every tensor into model.load_weights; fail if a parameter got no weight (unquantized models)."""
        with self._open(model_config) as checkpoint:
            stream = checkpoint.stream(device=self._device())
            loaded = model.load_weights(iter(stream))
            stats = stream.stats
        log.info(
            "liftoff: %s: %d tensors, %.2f GB in %.2fs (%.2f GB/s, %d retries)",
            checkpoint.url,
            stats.tensors,
            stats.bytes_delivered / 1e9,
            stats.seconds,
            stats.gbps,
            stats.retries,
        )
        if model_config.quantization is None and loaded is not None:
            missing = {name for name, _ in model.named_parameters()} - set(loaded)
            if missing:
                raise ValueError(f"weights not initialized from {checkpoint.url}: {sorted(missing)[:20]}")
