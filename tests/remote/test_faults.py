"""Faults between the FUSE daemon and a real S3 server (moto), injected by a relay in front of it:
starts ride out resets, truncated and corrupt bodies, 503s and delays; a chunk missing for good
fails the reads of its file alone, with EIO and a log line naming it."""

from __future__ import annotations

import subprocess

import pytest

from layerstore.catalog import find_image, load_index
from layerstore.layout import chunk_key
from layerstore.stores import StoreChain, open_store
from tests.faultproxy import FaultProxy
from tests.remote.conftest import convert, liftoff_pull, start_stack

RUN = ["/app/run.sh"]


def chunk_gets(head: bytes) -> bool:
    return head.startswith(b"GET ") and b"/chunks/sha256/" in head


@pytest.fixture
def faulty(tmp_path_factory, s3_server, s3_store_url, conformance_image):
    """The image converted into S3; a stack whose FUSE daemon reads the store through a fault relay."""
    convert(conformance_image, s3_store_url)
    proxy = FaultProxy(("127.0.0.1", int(s3_server.endpoint.rsplit(":", 1)[1])), match=chunk_gets, delay_seconds=0.5)
    relayed = s3_store_url.replace("?", f"?endpoint_url={proxy.endpoint}&")
    stack = start_stack(tmp_path_factory.mktemp("faults"), relayed, fused_args=["--fetch-retry-seconds", "4"])
    yield stack, proxy, s3_store_url
    stack.stop()
    proxy.stop()


def run(stack, image, name: str, *command: str) -> subprocess.CompletedProcess:
    argv = ["ctr", "--address", stack.containerd.address, "run", "--rm", "--snapshotter", "liftoff", image.ref, name, *command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_transient_faults_are_retried(faulty, conformance_image):
    stack, proxy, _ = faulty
    liftoff_pull(stack, conformance_image.ref)
    proxy.inject("reset", "truncate", "corrupt", "503", "delay", "corrupt", "reset")
    done = run(stack, conformance_image, "flaky", *RUN)
    assert done.returncode == 0 and done.stdout == "lazily started\nNAME=liftoff-test\nVERSION=2\n", done.stderr
    assert not proxy.faults, "every fault was met by a fetch"
    fetch = stack.fused().status().fetch
    assert fetch.failures == 0 and fetch.retries >= 2, fetch
    log = (stack.workdir / "fused.log").read_text()
    # the corrupt bodies were caught (by S3's response checksum, else by our sha256), never served
    assert "did not match calculated checksum" in log or "does not match its digest" in log


def test_missing_chunk_fails_its_file_only(faulty, conformance_image):
    stack, _, store_url = faulty
    store = open_store(store_url)
    chain = StoreChain([store])
    _, record = find_image(chain, conformance_image.ref)
    app = load_index(chain, record.layers[2].digest)
    model = next(e for e in app.entries if e.path == b"app/model.bin")
    lost = app.chunks[model.extents[1].chunk].sha256
    store.delete(chunk_key(lost))
    liftoff_pull(stack, conformance_image.ref)
    done = run(
        stack,
        conformance_image,
        "missing",
        "sh",
        "-c",
        "cat /etc/os-release; cat /app/model.bin > /dev/null || echo model unreadable",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "NAME=liftoff-test\nVERSION=2\nmodel unreadable\n"
    assert "Input/output error" in done.stderr
    log = (stack.workdir / "fused.log").read_text()
    assert lost.hex() in log and record.layers[2].digest in log and "could not be fetched" in log
