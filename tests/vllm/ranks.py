"""One vLLM worker rank on the CPU: `python tests/vllm/ranks.py SPEC.json RANK` (tests/vllm runs one process a rank).

It does what vLLM's CPU worker does before it loads a model: load the general plugins (liftoff's entry point
registers load format "liftoff"), build the engine config, init vLLM's distributed environment with gloo and
the model-parallel groups. Then it builds the model twice with vLLM's own model classes, once filled by vLLM's
default safetensors loader from a local directory and once by liftoff's loader from S3, and writes every
parameter's and buffer's digest (and the liftoff loader's stats) to a JSON file for the test to compare.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import sys
import time
import traceback

import torch


def digests(model: torch.nn.Module) -> dict[str, list]:
    """name -> [dtype, shape, sha256 of the bytes] for every parameter and buffer of the model."""
    out = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        data = tensor.detach().contiguous().cpu()
        raw = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
        out[name] = [str(data.dtype), list(data.shape), hashlib.sha256(raw).hexdigest()]
    return out


def engine_config(spec: dict, load_format: str, model_dir: str, extra: dict | None):
    """vLLM's VllmConfig for the test model on the CPU, as `vllm serve` would build it from these arguments."""
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(
        model=model_dir,
        load_format=load_format,
        model_loader_extra_config=extra or {},
        tensor_parallel_size=spec["world"] // spec.get("pp", 1),
        pipeline_parallel_size=spec.get("pp", 1),
        distributed_executor_backend="mp" if spec["world"] > 1 else None,
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype=spec["dtype"],
        max_model_len=256,
        seed=0,
    )
    return args.create_engine_config()


def build(config, rank: int):
    """The model vLLM's worker would get from this config's load format, and the loader that filled it."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader import get_model_loader

    with set_current_vllm_config(config):
        loader = get_model_loader(config.load_config)
        model = loader.load_model(vllm_config=config, model_config=config.model_config)
    return model, loader


def main(spec_path: str, rank: int) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    out: dict = {"rank": rank}
    started = time.monotonic()
    try:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER
        from vllm.plugins import load_general_plugins
        from vllm.v1.worker.gpu_worker import init_worker_distributed_environment

        points = importlib.metadata.entry_points(group="vllm.general_plugins")
        out["entry_points"] = [[e.dist.name if e.dist else None, e.name, e.value] for e in points]
        load_general_plugins()  # vLLM's own plugin loading: every vllm.general_plugins entry point
        liftoff_loader = _LOAD_FORMAT_TO_MODEL_LOADER.get("liftoff")
        out["liftoff_loader"] = f"{liftoff_loader.__module__}.{liftoff_loader.__qualname__}" if liftoff_loader else None

        from weightstream.vllm_plugin import fetch_config_dir

        config_dir = os.path.join(spec["workdir"], f"config-rank{rank}")
        out["config_files"] = fetch_config_dir(spec["url"], config_dir)  # what a node does before `vllm serve`
        default_config = engine_config(spec, "safetensors", spec["local_dir"], None)
        liftoff_config = engine_config(spec, "liftoff", config_dir, {"url": spec["url"], **spec.get("extra", {})})
        out["device"] = str(default_config.device_config.device)
        with set_current_vllm_config(default_config):
            init_worker_distributed_environment(default_config, rank, spec["init_method"], rank, "gloo")
        from vllm.distributed.parallel_state import get_pp_group, get_tp_group

        tp = get_tp_group()
        backend = str(torch.distributed.get_backend(tp.cpu_group))
        out["tp"] = {"rank": tp.rank_in_group, "world": tp.world_size, "backend": backend}
        out["pp"] = {"rank": get_pp_group().rank_in_group, "world": get_pp_group().world_size}

        model, _ = build(default_config, rank)
        out["default"] = digests(model)
        out["model_class"] = f"{type(model).__module__}.{type(model).__qualname__}"
        del model
        model, loader = build(liftoff_config, rank)
        out["liftoff"] = digests(model)
        out["loader_class"] = f"{type(loader).__module__}.{type(loader).__qualname__}"
        out["stats"] = vars(loader.stats) if getattr(loader, "stats", None) is not None else None
        import weightstream

        out["weightstream_file"] = weightstream.__file__
    except BaseException as e:
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()
    out["seconds"] = time.monotonic() - started
    with open(os.path.join(spec["workdir"], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    if "error" not in out:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
