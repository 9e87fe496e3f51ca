"""The CPU twin of a vLLM replica: a Serve deployment of TinyLM whose weights stream from the
store through weightstream (or, to compare, are downloaded to disk and then loaded).

    app = build_twin_app("s3://bucket/models/tiny/", ReplicaOptions(...))
    serve.run(app, name="tiny", route_prefix="/tiny")
    # or from a config file: import_path: serve_integration.examples.twin:twin_app
    POST /tiny {"prompt": "...", "max_new_tokens": 16} -> {"text": ..., "replica": {...}}
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from serve_integration.replica import ReplicaOptions

log = logging.getLogger(__name__)
LOADERS = ("weightstream", "download")
DOWNLOAD_CONCURRENCY = 64  # the seed's `aws s3 cp` tuning: max_concurrent_requests
DOWNLOAD_PART = 16 << 20  # and multipart_chunksize


# What torch.nn layers call from reset_parameters(); no-ops while an empty model is built.
_INITIALIZERS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "xavier_uniform_",
    "xavier_normal_",
)


@contextlib.contextmanager
def _initializers_skipped() -> Iterator[None]:
    """torch.nn.init's initializers do nothing inside (the loader overwrites every byte). Process-global:
    build models from one thread at a time."""
    import torch

    saved = {name: getattr(torch.nn.init, name) for name in _INITIALIZERS}
    try:
        for name in _INITIALIZERS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def empty_model(config_text: str):
    """TinyLM with its parameters allocated and uninitialized (the loader fills every byte).

    Built on the CPU with the initializers skipped: no page is touched until the load writes it. Not on the
    meta device: there `normal_` and `to_empty` run torch's Python reference kernels, whose first use imports
    sympy and ~800 modules (1.2-1.7 s of a replica's start here)."""
    from serve_integration.examples.tinylm import TinyConfig, TinyLM

    with _initializers_skipped():
        return TinyLM(TinyConfig.from_json(config_text)).eval()


def load_streaming(model_url: str):
    """TinyLM with its weights streamed straight into its parameters (no disk)."""
    import weightstream

    with weightstream.open(model_url) as checkpoint:
        model = empty_model(checkpoint.location.read_small("config.json").decode())
        weightstream.load_into(model, checkpoint, strict=True)
    return model


def load_downloading(model_url: str, evict: bool = False):
    """The baseline (`aws s3 cp`, then load): boto3 download_file of config.json and the checkpoint
    (model.safetensors, or the shards its index names) to local disk, then safetensors.

    The transfer is configured as the seed configured `aws s3 cp` for throughput (64 concurrent requests,
    16 MB parts; boto3's s3transfer is the awscli's engine). `evict` flushes the downloaded files and drops
    them from the page cache before loading (a node without RAM to spare reads them back from its disk)."""
    import boto3
    import boto3.s3.transfer
    import botocore.config
    import botocore.exceptions
    from safetensors.torch import load_file

    parts = urlsplit(model_url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    style = "path" if query.get("path_style", "").lower() in ("1", "true", "yes") else "auto"
    client = boto3.client(
        "s3",
        endpoint_url=query.get("endpoint_url"),
        region_name=query.get("region"),
        config=botocore.config.Config(s3={"addressing_style": style}, max_pool_connections=DOWNLOAD_CONCURRENCY),
    )
    transfer = boto3.s3.transfer.TransferConfig(
        max_concurrency=DOWNLOAD_CONCURRENCY, multipart_chunksize=DOWNLOAD_PART, multipart_threshold=DOWNLOAD_PART
    )
    prefix = parts.path.lstrip("/")
    prefix = prefix if prefix.endswith("/") or not prefix else prefix + "/"
    directory = tempfile.mkdtemp(prefix="liftoff-download-")
    try:
        try:
            index = client.get_object(Bucket=parts.netloc, Key=prefix + "model.safetensors.index.json")["Body"].read()
            files = sorted(set(json.loads(index)["weight_map"].values()))
        except botocore.exceptions.ClientError:
            files = ["model.safetensors"]
        for name in ["config.json", *files]:
            client.download_file(parts.netloc, prefix + name, os.path.join(directory, name), Config=transfer)
        if evict:
            for name in files:
                _evict(os.path.join(directory, name))
        model = empty_model(Path(directory, "config.json").read_text())
        state = {}
        for name in files:
            state.update(load_file(os.path.join(directory, name)))
        model.load_state_dict(state, strict=True, assign=True)
        return model
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _evict(path: str) -> None:
    """Write a file back to disk and drop its pages from the page cache (no privilege needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_up(model) -> float:
    """One short generation before the replica says it is ready (as vLLM warms its engine up):
    the first forward pass touches code and pages the load did not, and a startup profile recorded
    until "ready" then covers them. Returns the seconds it took."""
    started = time.monotonic()
    model.generate("warm up", 1)
    return time.monotonic() - started


class TinyLMServer:
    """One replica: loads the model in its constructor (so Serve routes nothing to it before),
    then answers generation requests."""

    def __init__(self, model_url: str, loader: str = "weightstream") -> None:
        if loader not in LOADERS:
            raise ValueError(f"unknown loader {loader!r}: use one of {', '.join(LOADERS)}")
        started = time.monotonic()
        self.model = load_streaming(model_url) if loader == "weightstream" else load_downloading(model_url)
        loaded = time.monotonic()
        warm = warm_up(self.model)
        self.info = {
            "loader": loader,
            "load_seconds": round(loaded - started, 3),
            "warmup_seconds": round(warm, 3),
            "pid": os.getpid(),
        }
        log.info("TinyLM replica ready: %s", self.info)

    def check_health(self) -> None:
        """Serve's health check: the constructor only returns once the weights are in."""
        if self.model is None:
            raise RuntimeError("the model is not loaded")

    async def __call__(self, request) -> dict:
        body = await request.json()
        text = self.model.generate(str(body.get("prompt", "")), int(body.get("max_new_tokens", 16)))
        return {"text": text, "replica": self.info}


def build_twin_app(model_url: str, options: ReplicaOptions | None = None, loader: str = "weightstream", name: str = "TinyLM"):
    """A Ray Serve application serving TinyLM from `model_url` with the given replica options."""
    from ray import serve

    options = options or ReplicaOptions()
    deployment = serve.deployment(TinyLMServer, name=name, **options.deployment_options())
    return deployment.bind(model_url, loader)


def twin_app(args: dict[str, Any]):
    """Config-file builder (`import_path: serve_integration.examples.twin:twin_app`): TinyLM replicas
    loading from args["model_url"] (args["loader"]: weightstream or download)."""
    from serve_integration.apps import _options

    return build_twin_app(args["model_url"], _options(args), loader=args.get("loader", "weightstream"))
