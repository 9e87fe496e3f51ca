"""weightstream in a weights-only install (boto3, requests, torch, safetensors, numpy): nothing it imports, from
layerstore included, may need grpc, protobuf or zstandard."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import save_file

MODULES = [
    "weightstream",
    "weightstream.api",
    "weightstream.checkpoint",
    "weightstream.cli",
    "weightstream.cuda",
    "weightstream.engine",
    "weightstream.errors",
    "weightstream.format",
    "weightstream.hostsink",
    "weightstream.httpreader",
    "weightstream.localreader",
    "weightstream.options",
    "weightstream.plan",
    "weightstream.pool",
    "weightstream.sources",
    "weightstream.tp",
]

CHILD = """
import importlib, json, sys
for name in ("grpc", "google.protobuf", "zstandard"):
    sys.modules[name] = None  # an import of any of them now raises ImportError
for name in sys.argv[2:]:
    importlib.import_module(name)
from layerstore import s3url
s3url.make_client(s3url.parse("s3://bucket/p?region=us-east-1"), connect_timeout=1, read_timeout=1)
import weightstream
state = weightstream.load(sys.argv[1])
print(json.dumps({name: [str(t.dtype), list(t.shape), t.flatten().tolist()] for name, t in state.items()}))
"""


def test_weightstream_imports_and_loads_without_grpc_protobuf_or_zstandard(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([7, 8], dtype=torch.int64)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, f"file://{tmp_path}", *MODULES], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "a": ["torch.float32", [2, 3], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]],
        "b": ["torch.int64", [2], [7, 8]],
    }
