"""The store in-process: crash states left on disk are repaired at start, and the extension points the
lazy-layer work builds on (prepare hooks, Layout.lower_dir) behave as documented."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from snapshotter.errors import AlreadyExists
from snapshotter.filters import parse_all
from snapshotter.layout import Layout
from snapshotter.metadata import Kind
from snapshotter.mounts import OverlayFeatures
from snapshotter.store import PrepareRequest, SnapshotStore

REF = "containerd.io/snapshot.ref"


def active(key: str, parent: str = "", labels: dict | None = None) -> PrepareRequest:
    return PrepareRequest("default", key, parent, Kind.ACTIVE, labels or {})


@pytest.fixture
def store(tmp_path):
    s = SnapshotStore(tmp_path / "root", features=OverlayFeatures())
    yield s
    s.close()


def test_start_repairs_what_a_crash_left(tmp_path):
    root = tmp_path / "root"
    store = SnapshotStore(root, features=OverlayFeatures())
    store.prepare(active("a"))
    store.commit("default", "A", "a", {})
    store.prepare(active("b", parent="A"))
    b = store.get("default", "b")
    store.close()

    snapshots = root / "snapshots"
    os.rename(snapshots / str(b.id), snapshots / f"rm-{b.id}-deadbeef")  # a remove that never committed
    (snapshots / "new-abc" / "fs").mkdir(parents=True)  # a prepare that never committed
    (snapshots / "777" / "fs").mkdir(parents=True)  # a prepare renamed into place, never committed
    (snapshots / "rm-778-cafe" / "fs").mkdir(parents=True)  # a committed remove, not yet deleted

    store = SnapshotStore(root, features=OverlayFeatures())
    try:
        assert sorted(os.listdir(snapshots)) == sorted([str(store.get("default", "A").id), str(b.id)])
        assert store.mounts("default", "b")[0].type == "overlay"
        assert (snapshots / str(b.id) / "work").is_dir()
    finally:
        store.close()


def test_prepare_hooks_can_answer_labelled_prepares(store):
    seen = []

    def remote_handshake(s: SnapshotStore, request: PrepareRequest):
        seen.append(request.key)
        ref = request.labels.get(REF)
        if not ref:
            return None  # ordinary prepare: fall through
        parent = s.get(request.namespace, request.parent).id if request.parent else None
        with s.meta.write() as tx:
            tx.insert(request.namespace, f"remote {ref}", Kind.COMMITTED, parent, {REF: ref})
        raise AlreadyExists(f"target snapshot {ref!r} exists")

    store.prepare_hooks.append(remote_handshake)
    store.prepare(active("plain"))
    assert store.get("default", "plain").kind == Kind.ACTIVE
    with pytest.raises(AlreadyExists):
        store.prepare(active("extract-1 sha256:abc", labels={REF: "sha256:abc"}))
    assert seen == ["plain", "extract-1 sha256:abc"]
    found = list(store.list("default", parse_all([f'labels."{REF}"==sha256:abc,parent==""'])))
    assert [(s.key, s.kind) for s in found] == [("remote sha256:abc", Kind.COMMITTED)]


def test_lower_dir_is_the_single_place_that_names_lower_layers(tmp_path):
    remote = tmp_path / "remote"

    class ElsewhereLayout(Layout):
        def lower_dir(self, snapshot) -> Path:
            path = remote / str(snapshot.id)  # stands for a FUSE mount of the layer
            path.mkdir(parents=True, exist_ok=True)
            return path

    store = SnapshotStore(tmp_path / "root", features=OverlayFeatures(), layout=ElsewhereLayout(tmp_path / "root"))
    try:
        store.prepare(active("a"))
        store.commit("default", "A", "a", {})
        store.prepare(active("b", parent="A"))
        store.commit("default", "B", "b", {})
        (mount,) = store.prepare(active("c", parent="B"))
        a, b = store.get("default", "A").id, store.get("default", "B").id
        assert mount.options[-1] == f"lowerdir={remote / str(b)}:{remote / str(a)}"
        (view,) = store.prepare(PrepareRequest("default", "v", "A", Kind.VIEW))
        assert (view.type, view.source) == ("bind", str(remote / str(a)))
    finally:
        store.close()
