"""weightstream: safetensors from S3 straight into CPU and GPU memory.

import weightstream
state = weightstream.load("s3://bucket/llama/", device="cuda:0")
with weightstream.open("s3://bucket/llama/") as ckpt:
    for name, tensor in ckpt:          # bounded memory, file order
        ...
weightstream.load_into(model, "s3://bucket/llama/")
"""

from weightstream.api import Checkpoint, LoadResult, TensorStream, load, load_into, name_filter, open
from weightstream.engine import StreamStats
from weightstream.errors import (
    CheckpointFormatError,
    CheckpointNotFound,
    FetchError,
    IntegrityError,
    LoadMismatchError,
    WeightsError,
)
from weightstream.options import StreamOptions
from weightstream.plan import TensorSlice

__all__ = [
    "Checkpoint",
    "CheckpointFormatError",
    "CheckpointNotFound",
    "FetchError",
    "IntegrityError",
    "LoadMismatchError",
    "LoadResult",
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
