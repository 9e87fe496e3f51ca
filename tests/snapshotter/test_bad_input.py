"""Bad requests get clear gRPC errors and change nothing: not the database, not the disk."""

from __future__ import annotations

import grpc
import pytest

from layerstore.pb.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from tests.snapshotter.helpers import code_of, db_state, disk_state

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
BIG = "x" * 4096  # with any key, over containerd's 4096-byte limit per label


@pytest.fixture
def populated(api):
    api.prepare("base-active", labels={"k": "v"})
    api.commit("base", "base-active", labels={"k": "v"})
    api.prepare("work", parent="base")
    return api


def assert_refused(snapshotter, call, code, *fragments) -> None:
    before = (db_state(snapshotter.root), disk_state(snapshotter.root))
    got, message = code_of(call)
    assert got == code, (got, message)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert (db_state(snapshotter.root), disk_state(snapshotter.root)) == before, "a refused request changed state"


@pytest.mark.parametrize(
    "key",
    ["a/../b", "../escape", "..", "a/./b", "/absolute", "trailing/", "a//b", "new\x00line", "tab\there", ""],
)
def test_bad_keys(populated, snapshotter, key):
    api = populated
    assert_refused(snapshotter, lambda: api.prepare(key), INVALID_ARGUMENT, "snapshot key")
    assert_refused(snapshotter, lambda: api.view(key, parent="base"), INVALID_ARGUMENT, "snapshot key")
    assert_refused(snapshotter, lambda: api.prepare("fine", parent=key or "a/../b"), INVALID_ARGUMENT, "parent")
    assert_refused(snapshotter, lambda: api.commit(key, "work"), INVALID_ARGUMENT, "snapshot name")


def test_keys_with_slashes_like_containerds_are_fine(populated):
    populated.prepare("default/12/extract-123-abc sha256:0123", parent="base")
    populated.prepare("k8s.io/3/with.dots..inside/and-more")


@pytest.mark.parametrize(
    "filters",
    [["name=="], ["kind=active"], ["labels.a==b c"], ['"open'], ["name~=/(/"], ["kind==view", "parent==/x/"], [","]],
)
def test_malformed_filters(populated, snapshotter, filters):
    assert_refused(snapshotter, lambda: populated.list(*filters), INVALID_ARGUMENT, "invalid filter")


def test_missing_parent(populated, snapshotter):
    assert_refused(
        snapshotter, lambda: populated.prepare("orphan", parent="no-such-layer"), grpc.StatusCode.NOT_FOUND, "'no-such-layer'"
    )
    assert_refused(snapshotter, lambda: populated.view("orphan", parent="no-such-layer"), grpc.StatusCode.NOT_FOUND, "parent")


def test_huge_labels(populated, snapshotter):
    api = populated
    assert_refused(snapshotter, lambda: api.prepare("big", labels={"k": BIG}), INVALID_ARGUMENT, "4096", "'k'")
    assert_refused(snapshotter, lambda: api.view("big", parent="base", labels={BIG: "v"}), INVALID_ARGUMENT, "4096")
    assert_refused(snapshotter, lambda: api.commit("big", "work", labels={"ok": "1", "k": BIG}), INVALID_ARGUMENT, "4096")
    assert_refused(snapshotter, lambda: api.update("base", {"k": BIG}, ["labels.k"]), INVALID_ARGUMENT, "4096")
    assert api.stat("work").kind == pb.ACTIVE
    # exactly at the limit is allowed
    api.update("base", {"k": "y" * 4095}, ["labels.k"])
    assert api.stat("base").labels["k"] == "y" * 4095


def test_immutable_fields_and_bad_namespace(populated, snapshotter):
    api = populated
    assert_refused(snapshotter, lambda: api.update("base", {"k": "w"}, ["labels.k", "parent"]), INVALID_ARGUMENT, "'parent'")
    assert api.stat("base").labels["k"] == "v"  # the valid part of the mask was not applied either
    assert_refused(snapshotter, lambda: api.prepare("x", ns="bad namespace!"), INVALID_ARGUMENT, "namespace")
    assert_refused(snapshotter, lambda: api.stub.Update(pb.UpdateSnapshotRequest(), timeout=10), INVALID_ARGUMENT, "name")
