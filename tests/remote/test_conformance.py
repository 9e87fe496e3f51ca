"""The tree a lazily started image shows equals, entry by entry, what containerd's own overlayfs
snapshotter unpacks from the same image: type, mode, owner, size, mtime, link target, device,
xattrs and content of every entry."""

from __future__ import annotations

import grpc
import pytest

from tests.remote.conftest import convert
from tests.remote.helpers import Snapshots, comparable, handshake, mounted_chain, tree
from tests.remote.images import IMPLICIT_DIRS


@pytest.fixture(scope="module")
def reference_tree(stack, conformance_image, tmp_path_factory) -> dict:
    """containerd's overlayfs snapshotter: full pull, then the top layer mounted."""
    stack.containerd.ctr("image", "pull", "--plain-http", "--snapshotter", "overlayfs", conformance_image.ref)
    api = Snapshots(stack.containerd.address, "overlayfs")
    with mounted_chain(api, conformance_image.chain_ids[-1], tmp_path_factory.mktemp("ref") / "mnt") as root:
        entries = tree(root)
    api.close()
    return entries


def test_lazy_tree_equals_overlayfs(stack, conformance_image, reference_tree, tmp_path):
    convert(conformance_image, stack.store_url)
    api = Snapshots(stack.containerd.address, "liftoff")
    codes = handshake(api, conformance_image.chain_ids)
    assert codes == [grpc.StatusCode.ALREADY_EXISTS] * 3, "every converted layer must be answered remotely"
    for chain_id in conformance_image.chain_ids:
        assert api.stat(chain_id).name == chain_id  # containerd's own record of the remote snapshot
    with mounted_chain(api, conformance_image.chain_ids[-1], tmp_path / "mnt") as root:
        lazy = tree(root)
    assert set(lazy) == set(reference_tree)
    expected = comparable(reference_tree)
    got = comparable(lazy)
    different = {path: (got[path], expected[path]) for path in expected if got[path] != expected[path]}
    # Directories no layer lists get the unpack time from containerd; they are the only difference.
    assert sorted(different) == IMPLICIT_DIRS
    for mine, theirs in different.values():
        assert mine[:4] + mine[5:] == theirs[:4] + theirs[5:]
