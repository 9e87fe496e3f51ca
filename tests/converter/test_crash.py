"""A conversion killed with SIGKILL at any moment leaves a consistent store; re-running completes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from layerstore.catalog import iter_records, load_index
from layerstore.layout import CHAINS, CHUNKS, IMAGES, LAYERS, chunk_key
from layerstore.records import ImageRecord
from layerstore.stores import StoreChain, open_store
from layerstore.stores.file import TMP_MARK
from liftoff.devstack.ocibuild import LayoutWriter
from tests.conftest import ROOT, run_cli
from tests.converter.images import CHUNK, many_files_layer
from tests.converter.slowregistry import SlowRegistry


@pytest.fixture(scope="module")
def slow_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    writer = LayoutWriter(root)
    layers = [many_files_layer(600, seed=s) for s in (1, 2, 3)]  # ~3 MB each, 3 layers
    writer.tag(writer.add_image(layers, compression=["gzip", "zstd", "none"]), "v1")
    registry = SlowRegistry(root, bytes_per_second=3 << 20)
    yield f"{registry.host}/crash/app:v1"
    registry.stop()


def consistent(store_url: str) -> None:
    """Every image record's layers are indexed and every index's chunks exist."""
    store = open_store(store_url)
    chain = StoreChain([store])
    for key in store.list(LAYERS):
        index = load_index(chain, "sha256:" + key.split("/")[2])
        for chunk in index.chunks:
            assert store.size(chunk_key(chunk.sha256)) is not None, f"index {key} names a missing chunk"
    for _, record in iter_records(chain):
        assert isinstance(record, ImageRecord)
        for layer in record.layers:
            load_index(chain, layer.digest)


def _count(path, prefix: str) -> int:
    """Objects visible under `prefix`: a killed writer's temp file is not one."""
    base = path / prefix
    if not base.exists():
        return 0
    return sum(1 for _, _, files in os.walk(base) for name in files if TMP_MARK not in name)


@pytest.mark.parametrize(
    "point",
    [
        ("first chunk", CHUNKS, 1),
        ("many chunks", CHUNKS, 60),
        ("first index", LAYERS, 1),
        ("second index", LAYERS, 2),
        ("chain records", CHAINS, 1),
    ],
    ids=lambda p: p[0],
)
def test_kill_and_rerun(point, slow_source, tmp_path):
    _, prefix, threshold = point
    store_path = tmp_path / "store"
    store_url = f"file://{store_path}"
    args = [
        sys.executable,
        "-m",
        "liftoff",
        "convert",
        slow_source,
        "--plain-http",
        "--store",
        store_url,
        "--chunk-size",
        str(CHUNK),
        "--layer-jobs",
        "1",
    ]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while _count(store_path, prefix) < threshold and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the conversion finished before the kill point"
    consistent(store_url)
    if prefix != CHAINS:  # killed before the records: no image may be visible yet
        assert _count(store_path, IMAGES) == 0
    run_cli("convert", slow_source, "--plain-http", "--store", store_url, "--chunk-size", str(CHUNK))
    consistent(store_url)
    assert _count(store_path, IMAGES) == 1
    run_cli("verify", slow_source, "--store", store_url)
