"""The tree a lazily started image shows equals, entry by entry, what containerd's own overlayfs
snapshotter unpacks from the same image: type, mode, owner, size, mtime, link count, link target,
device, xattrs and content of every entry (the image's cases: tests/remote/images.py)."""

from __future__ import annotations

import uuid

import grpc
import pytest

from layerstore.pb.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from layerstore.pb.liftoff.index.v1 import index_pb2
from snapshotter.fuse_tree import View
from tests.remote.conftest import convert
from tests.remote.helpers import (
    Snapshots,
    comparable,
    erofs_mounts,
    file_backed_erofs,
    handshake,
    mounted_chain,
    tree,
)
from tests.remote.images import UNPACK_TIME_DIRS


@pytest.fixture(scope="module")
def reference_tree(stack, conformance_image, tmp_path_factory) -> dict:
    """containerd's overlayfs snapshotter: full pull, then the top layer mounted."""
    stack.containerd.ctr("image", "pull", "--plain-http", "--snapshotter", "overlayfs", conformance_image.ref)
    with (
        Snapshots(stack.containerd.address, "overlayfs") as api,
        mounted_chain(api, conformance_image.chain_ids[-1], tmp_path_factory.mktemp("ref") / "mnt") as root,
    ):
        return tree(root)


def test_lazy_tree_equals_overlayfs(data_path_stack, conformance_image, reference_tree, tmp_path):
    """Every data path: FUSE passthrough of whole local files (Linux 6.9+), --no-passthrough, and EROFS views
    (--erofs, Linux 6.12+)."""
    stack = data_path_stack
    convert(conformance_image, stack.store_url)
    with Snapshots(stack.containerd.address, "liftoff") as api:
        codes = handshake(api, conformance_image.chain_ids)
        assert codes == [grpc.StatusCode.ALREADY_EXISTS] * 3, "every converted layer must be answered remotely"
        for chain_id in conformance_image.chain_ids:
            assert api.stat(chain_id).name == chain_id  # containerd's own record of the remote snapshot
        with mounted_chain(api, conformance_image.chain_ids[-1], tmp_path / "mnt") as root:
            lazy = tree(root)
            if "stack-erofs" in str(stack.workdir) and not file_backed_erofs():
                assert erofs_mounts(stack.root), "the view should be an EROFS image on this kernel"
    assert sorted(set(lazy) ^ set(reference_tree)) == [], "paths only one side has"
    expected = comparable(reference_tree)
    got = comparable(lazy)
    different = {path: (got[path], expected[path]) for path in expected if got[path] != expected[path]}
    # Directories made or written into by a layer without a header for them get the unpack time from
    # containerd; their mtime is the only difference.
    assert sorted(different) == UNPACK_TIME_DIRS, different
    for mine, theirs in different.values():
        assert mine[:4] + mine[5:] == theirs[:4] + theirs[5:]


def collect_garbage(address: str, namespace: str = "default") -> None:
    """Make containerd's garbage collector run now: deleting a lease with `sync` waits for a collection."""
    with grpc.insecure_channel(f"unix:{address}") as channel:
        leases = leases_pb2_grpc.LeasesStub(channel)
        md = [("containerd-namespace", namespace)]
        lease = leases.Create(leases_pb2.CreateRequest(id=f"gc-now-{uuid.uuid4().hex[:8]}"), metadata=md, timeout=30).lease
        leases.Delete(leases_pb2.DeleteRequest(id=lease.id, sync=True), metadata=md, timeout=60)


def test_what_the_tests_create_in_containerd_survives_its_garbage_collector(stack, conformance_image, tmp_path):
    """The remote snapshots a handshake makes are held until the test is done with them, however busy the
    machine (the collector once ran between the handshake and the Prepare on top of it)."""
    convert(conformance_image, stack.store_url)
    with Snapshots(stack.containerd.address, "liftoff", namespace="gc-test") as api:
        handshake(api, conformance_image.chain_ids)
        collect_garbage(stack.containerd.address, "gc-test")
        assert api.stat(conformance_image.chain_ids[-1]).name == conformance_image.chain_ids[-1]
        with mounted_chain(api, conformance_image.chain_ids[-1], tmp_path / "mnt") as root:
            assert (root / "app" / "run.sh").read_bytes().startswith(b"#!/bin/sh")
    collect_garbage(stack.containerd.address, "gc-test")  # the lease is gone: so are the snapshots
    with Snapshots(stack.containerd.address, "liftoff", namespace="gc-test") as api:
        with pytest.raises(grpc.RpcError) as error:
            api.stat(conformance_image.chain_ids[-1])
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_times_before_the_epoch_are_the_epoch_in_the_view():
    """containerd's applier sets the epoch for a time before 1970; the view does too (a negative time
    also cannot be packed into a FUSE attribute: the kernel would wait on the request forever)."""
    layer = index_pb2.LayerIndex()
    layer.entries.add(path=b"d", type=index_pb2.ENTRY_TYPE_DIRECTORY, mode=0o755, mtime_ns=-(10**9))
    layer.entries.add(path=b"d/f", type=index_pb2.ENTRY_TYPE_REGULAR, mode=0o644, mtime_ns=-100 * 10**9)
    view = View([layer])
    assert [view.resolve(path).mtime_ns for path in (b"d", b"d/f")] == [0, 0]
