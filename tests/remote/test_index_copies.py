"""A corrupt local copy of a layer index (a torn write, a bad block on the node) while the store's copy
is fine: the FUSE daemon and the pull handshake fetch it again from the store, check it and replace it,
instead of failing with "re-run liftoff convert". With the store unreachable too, the error says both."""

from __future__ import annotations

import pytest

from layerstore.layout import layer_index_key
from tests.remote.conftest import convert, liftoff_pull, start_stack, stop_fused


@pytest.fixture
def own_stack(tmp_path_factory):
    store = tmp_path_factory.mktemp("copies-store")
    s = start_stack(tmp_path_factory.mktemp("copies"), f"file://{store}")
    yield s, store
    s.stop()


def corrupt(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated, as after a crash mid-write


def local_index(stack, digest: str):
    return stack.root / "remote" / "indexes" / digest.split(":", 1)[1]


def layer_digests(summary: dict) -> list[str]:
    return [layer["digest"] for layer in summary["images"][0]["layers"]]


def test_fused_restarts_from_a_corrupt_local_index_by_fetching_it_again(own_stack, conformance_image):
    stack, store = own_stack
    digests = layer_digests(convert(conformance_image, stack.store_url))
    liftoff_pull(stack, conformance_image.ref)
    out = stack.containerd.ctr("run", "--rm", "--snapshotter", "liftoff", conformance_image.ref, "warm", "/app/run.sh")
    views = stack.fused().views()
    assert len(views) == 1
    stop_fused(stack.fused())
    for digest in digests:
        corrupt(local_index(stack, digest))
    stack.restart_snapshotter()  # starts the FUSE daemon again: it re-mounts the view
    assert stack.fused().views() == views
    for digest in digests:  # replaced by the store's (sound) copy
        assert local_index(stack, digest).read_bytes() == (store / layer_index_key(digest)).read_bytes()
    again = stack.containerd.ctr("run", "--rm", "--snapshotter", "liftoff", conformance_image.ref, "again", "/app/run.sh")
    assert again == out


def test_the_handshake_fetches_a_corrupt_local_index_again(own_stack, conformance_image):
    stack, store = own_stack
    digests = layer_digests(convert(conformance_image, stack.store_url))
    liftoff_pull(stack, conformance_image.ref)
    for digest in digests:
        corrupt(local_index(stack, digest))
    second = liftoff_pull(stack, conformance_image.ref, namespace="other")  # every layer's handshake again
    assert [layer["state"] for layer in second["layers"]] == ["remote"] * len(digests)
    for digest in digests:
        assert local_index(stack, digest).read_bytes() == (store / layer_index_key(digest)).read_bytes()


def test_corrupt_local_index_and_unreachable_store_are_both_named(own_stack, conformance_image, tmp_path):
    stack, store = own_stack
    digests = layer_digests(convert(conformance_image, stack.store_url))
    liftoff_pull(stack, conformance_image.ref)
    stop_fused(stack.fused())
    corrupt(local_index(stack, digests[-1]))
    log = stack.root / "remote" / "fused.log"
    logged = log.stat().st_size
    hidden = tmp_path / "store-away"
    store.rename(hidden)  # the store is now unreachable
    try:
        stack.restart_snapshotter()
        assert stack.fused().views() == {}  # the view cannot come back yet
        lines = [line for line in log.read_text()[logged:].splitlines() if "cannot restore view" in line]
        assert len(lines) == 1, log.read_text()[logged:]
        assert f"local index of {digests[-1]}: corrupt or truncated index" in lines[0]
        assert "the store cannot be reached" in lines[0] and "does not exist" in lines[0]
        assert "re-run liftoff convert" not in lines[0]
    finally:
        hidden.rename(store)
    # the store is back: the next container mounts the view, fetching the index again
    out = stack.containerd.ctr("run", "--rm", "--snapshotter", "liftoff", conformance_image.ref, "back", "/app/run.sh")
    assert out.startswith("lazily started")
    assert local_index(stack, digests[-1]).read_bytes() == (store / layer_index_key(digests[-1])).read_bytes()
