"""vLLM integration without importing vLLM: the `vllm.general_plugins` entry point and config-dir helper.

    liftoff weights config s3://bucket/llama/ /srv/llama-config      # config.json, tokenizer, ... (no weights)
    vllm serve /srv/llama-config --load-format liftoff \\
        --model-loader-extra-config '{"url": "s3://bucket/llama/"}'

vLLM refuses `--model s3://...` for load formats other than its own streamers,
so the model is a local directory holding the small files and the weights'
URL travels in the loader's extra config. vLLM calls general plugins in every
process it starts, so registration must be idempotent.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

LOAD_FORMAT = "liftoff"
_registered = False
log = logging.getLogger(__name__)


def register() -> None:
    """Register load format "liftoff" with vLLM (once per process; a no-op where vLLM is not installed)."""
    global _registered
    if _registered:
        return
    try:
        from vllm.model_executor.model_loader import register_model_loader
    except ImportError:
        log.debug("vllm is not installed: load format %r not registered", LOAD_FORMAT)
        return
    from weightstream.vllm_loader import LiftoffModelLoader

    register_model_loader(LOAD_FORMAT)(LiftoffModelLoader)
    _registered = True


EXTRA_KEYS = {
    "url": str,
    "endpoint_url": str,
    "region": str,
    "path_style": bool,
    "sha256": str,
    "device": str,
    "range_size": int,
    "concurrency": int,
    "pool_bytes": int,
    "stall_timeout": (int, float),
    "max_retries": int,
    "read_once": bool,
    "exchange_window_bytes": int,
}


def parse_extra_config(extra: object) -> dict:
    """Validate --model-loader-extra-config for load format liftoff; returns the settings."""
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise ValueError(f"model_loader_extra_config must be a JSON object for load format liftoff, got {type(extra).__name__}")
    unknown = set(extra) - set(EXTRA_KEYS)
    if unknown:
        raise ValueError(
            f"unknown model_loader_extra_config key(s) for load format liftoff: {sorted(unknown)}; known: {sorted(EXTRA_KEYS)}"
        )
    for key, value in extra.items():
        if not isinstance(value, EXTRA_KEYS[key]) or (EXTRA_KEYS[key] is int and isinstance(value, bool)):
            raise ValueError(f"model_loader_extra_config[{key!r}] has the wrong type ({type(value).__name__})")
    return dict(extra)


def fetch_config_dir(url: str, dest: str | os.PathLike[str], **location_options: object) -> list[str]:
    """Copy every non-weight file directly under the checkpoint's prefix (config.json, tokenizer files, ...) to `dest`."""
    from weightstream.options import StreamOptions
    from weightstream.sources import open_location

    location = open_location(url, StreamOptions(), **location_options)  # type: ignore[arg-type]
    try:
        names = [n for n in location.names() if not n.endswith((".safetensors", ".safetensors.index.json", ".bin", ".pt"))]
        target = Path(dest)
        target.mkdir(parents=True, exist_ok=True)
        for name in names:
            (target / name).write_bytes(location.read_small(name))
        return names
    finally:
        location.close()
