"""The vLLM model loader for load format "liftoff" (vLLM's BaseModelLoader interface; imports vLLM).

The checkpoint URL and tunables come from `--model-loader-extra-config`
(keys below); `--model` is a local directory with config.json and the tokenizer
(see weightstream.vllm_plugin.fetch_config_dir). Tensors are streamed straight
into `model.load_weights` in file order, on the worker's GPU through the pinned
ring when CUDA is available, with memory held ahead of the model bounded by
pool_bytes. Each yielded tensor owns its memory, so vLLM's layerwise loading,
which holds a layer's weights until the layer is complete, stays correct.

Tensor parallelism: vLLM hands every rank full checkpoint tensors and each
parameter's weight_loader narrows them. Here the ranks of the worker's
tensor-parallel group (vLLM's get_tp_group(): its NCCL device_group on GPUs,
its gloo cpu_group on CPU) each stream about 1/N of the checkpoint and
broadcast it to the others (weightstream.readonce), so the node reads the
checkpoint once whatever the TP degree and every weight_loader still gets the
full tensors it expects; no model-specific split rules. Pipeline parallelism:
a stage reads only the tensors under modules its model holds (vLLM puts
parameterless placeholders where other stages' layers are). Set
"read_once": false to have every rank read everything (vLLM's own behaviour).
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
from weightstream.engine import StreamStats
from weightstream.readonce import model_stream
from weightstream.vllm_plugin import parse_extra_config

log = logging.getLogger(__name__)
LOADER_KEYS = ("url", "device", "read_once", "exchange_window_bytes")  # the rest are weightstream.open() tunables


def parallel_groups(device: torch.device) -> tuple[torch.distributed.ProcessGroup | None, bool]:
    """This worker's tensor-parallel process group (None without one, or with one rank) and whether the model is
    one pipeline stage, from vLLM's parallel state."""
    from vllm.distributed.parallel_state import get_pp_group, get_tp_group, model_parallel_is_initialized

    if not model_parallel_is_initialized():
        return None, False
    tp, pp = get_tp_group(), get_pp_group()
    group = tp.device_group if device.type == "cuda" else tp.cpu_group
    return (group if tp.world_size > 1 else None), pp.world_size > 1


class LiftoffModelLoader(BaseModelLoader):
    """Streams safetensors from s3://, file:// or a path straight into the model (no disk round trip)."""

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        self.settings = parse_extra_config(load_config.model_loader_extra_config)
        self.stats: StreamStats | None = None  # the last load_weights' (this rank's bytes fetched, received, ...)

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
        options = {k: v for k, v in self.settings.items() if k not in LOADER_KEYS}
        return weightstream.open(self._url(model_config), **options)

    def download_model(self, model_config: ModelConfig) -> None:
        """Nothing is downloaded ahead: open the checkpoint so a wrong URL or a corrupt header fails now."""
        with self._open(model_config):
            pass

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        """Stream every tensor into model.load_weights; fail if a parameter got no weight (unquantized models)."""
        device = torch.device(self._device())
        group, pipeline_parallel = parallel_groups(device) if self.settings.get("read_once", True) else (None, False)
        window = self.settings.get("exchange_window_bytes")
        with self._open(model_config) as checkpoint:
            stream = model_stream(
                checkpoint,
                model,
                device=device,
                group=group,
                pipeline_parallel=pipeline_parallel,
                **({"window_bytes": window} if window else {}),
            )
            loaded = model.load_weights(iter(stream))
            stats = self.stats = stream.stats
        log.info(
            "liftoff: %s: %d tensors, %.2f GB in %.2fs (this rank fetched %.2f GB at %.2f GB/s, %d retries; "
            "%.2f GB from its group)",
            checkpoint.url,
            stats.tensors,
            stats.bytes_delivered / 1e9,
            stats.seconds,
            stats.bytes_fetched / 1e9,
            stats.gbps,
            stats.retries,
            stats.bytes_received / 1e9,
        )
        if model_config.quantization is None and loaded is not None:
            missing = {name for name, _ in model.named_parameters()} - set(loaded)
            if missing:
                raise ValueError(f"weights not initialized from {checkpoint.url}: {sorted(missing)[:20]}")
