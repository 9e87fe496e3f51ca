"""Lazy pulls in real containerd: converted layers are never downloaded, containers run from
FUSE views, mixed images work, the cache honours its cap, and removing images releases space."""

from __future__ import annotations

import json
import time

import pytest

from liftoff.devstack.ocibuild import Member, make_tar
from tests.remote.conftest import build_image, convert, liftoff_pull, start_stack, stop_fused
from tests.remote.helpers import erofs_mounts, file_backed_erofs, kernel_release
from tests.remote.images import conformance_layers

RUN = ["/app/run.sh"]
EXPECTED = "lazily started\nNAME=liftoff-test\nVERSION=2\n"


def test_liftoff_pull_fetches_no_layer_blob_and_runs(data_path_stack, conformance_image, registry):
    stack = data_path_stack
    convert(conformance_image, stack.store_url)
    before = registry.blob_gets()
    result = liftoff_pull(stack, conformance_image.ref)
    assert [layer["state"] for layer in result["layers"]] == ["remote"] * 3
    assert registry.blob_gets() - before == 1  # the config; never a layer
    out = stack.containerd.ctr("run", "--rm", "--snapshotter", "liftoff", conformance_image.ref, "lazy-run", *RUN)
    assert out == EXPECTED
    status = stack.fused().status()
    image_bytes = sum(len(t) for t in conformance_image.layers)
    assert 0 < status.fetch.bytes < image_bytes / 4, status  # only what the start read
    # a second container of the same image shares the view and fetches nothing more
    fetched = status.fetch.chunks
    again = stack.containerd.ctr("run", "--rm", "--snapshotter", "liftoff", conformance_image.ref, "lazy-run-2", *RUN)
    assert again == EXPECTED
    assert stack.fused().status().fetch.chunks == fetched
    requests = {name: n for view in stack.fused().status().views for name, n in view.requests.items()}
    if "stack-erofs" in str(stack.workdir) and not file_backed_erofs():  # file-backed EROFS: the kernel answers
        assert erofs_mounts(stack.root), "the view should be an EROFS image on this kernel"
        assert requests.get("lookup", 0) <= 1 and "readdirplus" not in requests, requests
    if "stack-passthrough" not in str(stack.workdir):
        assert requests.get("open", 0) <= 1, requests  # no-open: the first OPEN is answered ENOSYS
    elif kernel_release() >= (6, 9):  # passthrough: every open is asked
        assert requests.get("open", 0) > 1, requests


def test_mixed_image_remote_base_local_top(stack, conformance_image, registry, tmp_path_factory):
    convert(conformance_image, stack.store_url)
    top = make_tar([Member("app", "dir"), Member("app/run.sh", data=b"#!/bin/sh\necho mixed\ncat /etc/os-release\n", mode=0o755)])
    mixed = build_image(tmp_path_factory, registry, "mixed", [*conformance_layers()[:2], top])
    before = registry.blob_gets()
    result = liftoff_pull(stack, mixed.ref)
    states = [layer["state"] for layer in result["layers"]]
    assert states[2] == "applied" and set(states[:2]) <= {"remote", "present"}, states  # present: pulled before
    assert registry.blob_gets() - before == 2  # config and the one unconverted layer
    out = stack.containerd.ctr("run", "--rm", "--snapshotter", "liftoff", mixed.ref, "mixed-run", *RUN)
    assert out == "mixed\nNAME=liftoff-test\nVERSION=2\n"


def test_unknown_index_version_falls_back_to_an_ordinary_pull(stack, registry, tmp_path_factory):
    from layerstore.index import decode_index, encode_index
    from layerstore.layout import layer_index_key
    from layerstore.stores import open_store

    layers = [make_tar([Member("bin", "dir"), Member("future", data=b"from the future\n")])]
    image = build_image(tmp_path_factory, registry, "future", layers)
    convert(image, stack.store_url)
    store = open_store(stack.store_url)
    summary_digest = json.loads(store.get(f"images/sha256/{image.manifest_digest.split(':')[1]}"))["layers"][0]["digest"]
    index = decode_index(store.get(layer_index_key(summary_digest)))
    index.format_major = 99
    store.put(layer_index_key(summary_digest), encode_index(index))
    result = liftoff_pull(stack, image.ref)
    assert [layer["state"] for layer in result["layers"]] == ["applied"]


@pytest.fixture
def small_cache_stack(tmp_path_factory, store_url):
    s = start_stack(tmp_path_factory.mktemp("small-cache"), store_url, "--cache-size", "2M")
    yield s
    s.stop()


def test_cache_cap_and_image_removal_release_space(small_cache_stack, conformance_image):
    stack = small_cache_stack
    convert(conformance_image, stack.store_url)
    liftoff_pull(stack, conformance_image.ref)
    out = stack.containerd.ctr(
        "run",
        "--rm",
        "--snapshotter",
        "liftoff",
        conformance_image.ref,
        "capped",
        "sh",
        "-c",
        "cat /app/model.bin /lib/big.so | sha256sum >/dev/null && echo read",
    )
    assert out == "read\n"
    cache = stack.fused().status().cache
    assert cache.bytes <= 2 << 20 and cache.evictions > 0, cache
    assert stack.fused().views(), "the view of the image is mounted"
    stack.containerd.ctr("image", "rm", "--sync", conformance_image.ref)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = stack.fused().status()
        if status.cache.chunks == 0 and not status.views:
            break
        time.sleep(0.2)
    assert status.cache.chunks == 0 and not status.views, status
    stop_fused(stack.fused())


def test_same_image_in_two_namespaces(stack, conformance_image):
    """containerd shares a remote snapshot between namespaces (its handshake lookup walks them all)."""
    convert(conformance_image, stack.store_url)
    for namespace in ("team-a", "team-b"):
        liftoff_pull(stack, conformance_image.ref, namespace=namespace)
        out = stack.containerd.ctr(
            "run", "--rm", "--snapshotter", "liftoff", conformance_image.ref, f"run-{namespace}", *RUN, namespace=namespace
        )
        assert out == EXPECTED
    stack.containerd.ctr("image", "rm", "--sync", conformance_image.ref, namespace="team-a")
    out = stack.containerd.ctr(
        "run", "--rm", "--snapshotter", "liftoff", conformance_image.ref, "after-a-left", *RUN, namespace="team-b"
    )
    assert out == EXPECTED
