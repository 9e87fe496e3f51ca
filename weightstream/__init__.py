"""weightstream: safetensors from S3 straight into CPU and GPU memory.

import weightstream
state = weightstream.load("s3://bucket/llama/", device="cuda:0")
with weightstream.open("s3://bucket/llama/") as ckpt:
    for name, tensor in ckpt:          # bounded memory, file order
        ...
weightstream.load_into(model, "s3://bucket/llama/")
weightstream.load_into(model, "s3://bucket/llama/", group=tp_group)   # the group reads it once in total
"""

from typing import TYPE_CHECKING

from weightstream.errors import (
    CheckpointFormatError,
    CheckpointNotFound,
    FetchError,
    IntegrityError,
    LoadMismatchError,
    WeightsError,
)
from weightstream.options import StreamOptions

if TYPE_CHECKING:
    from weightstream.api import Checkpoint, LoadResult, TensorStream, load, load_into, name_filter, open
    from weightstream.engine import StreamStats
    from weightstream.plan import TensorSlice
    from weightstream.readonce import SharedStream

_LAZY = {  # imported on first use: they need torch, which `liftoff` subcommands other than `weights` never load
    "Checkpoint": "weightstream.api",
    "LoadResult": "weightstream.api",
    "TensorStream": "weightstream.api",
    "load": "weightstream.api",
    "load_into": "weightstream.api",
    "name_filter": "weightstream.api",
    "open": "weightstream.api",
    "StreamStats": "weightstream.engine",
    "TensorSlice": "weightstream.plan",
    "SharedStream": "weightstream.readonce",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'weightstream' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "Checkpoint",
    "CheckpointFormatError",
    "CheckpointNotFound",
    "FetchError",
    "IntegrityError",
    "LoadMismatchError",
    "LoadResult",
    "SharedStream",
    "StreamOptions",
    "StreamStats",
    "TensorSlice",
    "TensorStream",
    "WeightsError",
    "load",
    "load_into",
    "name_filter",
    "open",
]
