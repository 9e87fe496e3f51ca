"""Fixtures for weightstream: checkpoints written by safetensors, uploaded to the moto S3 server, and a fault proxy."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from safetensors.torch import save_file

from tests.faultproxy import FaultProxy, header
from weightstream.format import DTYPES


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Random bytes viewed as `dtype` (every bit pattern, NaNs included: compare bytes, not values)."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).reshape(shape)


def every_dtype_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every safetensors dtype torch supports, in odd, scalar and empty shapes."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(3, 5, 7), (257, 129), (1,), (), (0,), (2, 0, 3), (4099,)]
    tensors = {}
    for code, dtype in DTYPES.items():
        for i, shape in enumerate(shapes):
            tensors[f"{code.lower()}.t{i}"] = random_tensor(shape, dtype, generator)
    return tensors


def as_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Same names, dtypes, shapes and bytes (bitwise: NaNs compare equal to themselves)."""
    assert sorted(actual) == sorted(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype, name
        assert tuple(got.shape) == tuple(want.shape), name
        assert as_bytes(got.cpu()) == as_bytes(want), name


def write_checkpoint(
    directory: Path, tensors: dict[str, torch.Tensor], shards: int = 1, metadata: dict | None = None
) -> list[str]:
    """model.safetensors, or `shards` files plus model.safetensors.index.json; returns the file names."""
    directory.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata=metadata)
        return ["model.safetensors"]
    names = sorted(tensors)
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    files = []
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(directory / file), metadata=metadata)
        weight_map.update({n: file for n in group})
        files.append(file)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return [*files, "model.safetensors.index.json"]


@dataclass
class S3Prefix:
    """A fresh bucket/prefix on the moto server; upload() puts local files there."""

    server: object
    bucket: str
    prefix: str
    query: str

    def url(self, name: str = "", endpoint: str | None = None) -> str:
        query = self.query + (f"&endpoint_url={endpoint}" if endpoint else "")
        return f"s3://{self.bucket}/{self.prefix}{name}?{query}"

    def put_bytes(self, name: str, data: bytes) -> None:
        self.server.client().put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data)

    def upload(self, directory: Path, names: list[str] | None = None) -> None:
        client = self.server.client()
        for path in sorted(directory.iterdir()) if names is None else [directory / n for n in names]:
            client.upload_file(str(path), self.bucket, self.prefix + path.name)


@pytest.fixture
def s3_prefix(s3_server, s3_store_url) -> S3Prefix:
    parts = urlsplit(s3_store_url)
    return S3Prefix(s3_server, parts.netloc, parts.path.strip("/") + "/model/", parts.query)


def is_data_range(request_head: bytes) -> bool:
    """A ranged GET that is not the header probe (which starts at byte 0)."""
    value = header(request_head, "Range")
    return request_head.startswith(b"GET ") and value is not None and not value.startswith("bytes=0-")


@pytest.fixture
def fault_proxy(s3_server) -> FaultProxy:
    """A real proxy in front of the S3 server; inject() queues faults for data range requests."""
    upstream = urlsplit(s3_server.endpoint)
    proxy = FaultProxy((upstream.hostname, upstream.port), match=is_data_range, stall_seconds=3.0)
    yield proxy
    proxy.stop()
