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


def test_empty_keys(populated, snapshotter):
    """containerd refuses an empty key (its bolt store has no empty bucket names), and so do we."""
    api = populated
    assert_refused(snapshotter, lambda: api.prepare(""), INVALID_ARGUMENT, "snapshot key is empty")
    assert_refused(snapshotter, lambda: api.view("", parent="base"), INVALID_ARGUMENT, "snapshot key is empty")
    assert_refused(snapshotter, lambda: api.commit("", "work"), INVALID_ARGUMENT, "snapshot name is empty")
    assert_refused(snapshotter, lambda: api.commit("done", ""), INVALID_ARGUMENT, "snapshot key is empty")
    for call in (api.stat, api.mounts, api.usage, api.remove):
        assert_refused(snapshotter, lambda call=call: call(""), INVALID_ARGUMENT, "snapshot key is empty")


# Keys containerd accepts (any non-empty string): its conformance suite uses absolute paths, which its
# metadata layer passes on as `<ns>/<seq>//tmp/...`; keys are never paths here, so none is refused.
ODD_KEYS = [
    "/tmp/snapshot-suite-1/work/preparing",
    "testsuite/7//tmp/snapshot-suite-1/work/preparing",
    "a/../b",
    "../escape",
    "..",
    ".",
    "a/./b",
    "trailing/",
    "a//b",
    "/",
    "new\nline",
    "nul\x00inside",
    "tab\there",
    " spaces and \u00e9 unicode ",
    "k" * 10000,
]


@pytest.mark.parametrize("key", ODD_KEYS, ids=lambda k: repr(k[:40]))
def test_keys_containerd_accepts_work(populated, key):
    """Every operation works on such a key, as parent too, and List and filters report it unchanged."""
    api = populated
    api.prepare(key, parent="base", labels={"k": "v"})
    assert api.stat(key).kind == pb.ACTIVE
    assert api.mounts(key)
    assert api.usage(key)[1] >= 1
    api.commit(key + "@c", key, labels={"k": "v"})
    child = api.prepare(key + "@child", parent=key + "@c")
    assert child
    assert api.stat(key + "@child").parent == key + "@c"
    assert {key + "@c", key + "@child"} <= api.names()
    assert api.names(f"parent=={_quoted(key + '@c')}") == {key + "@child"}
    api.update(key + "@c", {"n": "1"}, ["labels.n"])
    assert api.stat(key + "@c").labels == {"k": "v", "n": "1"}
    api.remove(key + "@child")
    api.remove(key + "@c")
    assert key + "@c" not in api.names()


def _quoted(value: str) -> str:
    """A filter value as a double-quoted Go string literal."""
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) > 0xFF else f"\\x{ord(ch):02x}")
    return '"' + "".join(out) + '"'


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


def test_update_checks_the_labels_it_keeps(populated, snapshotter):
    """As containerd's Update: the limit applies to the labels the snapshot ends up with, not to those
    the mask leaves out; an empty value deletes, so a huge label can be removed."""
    api = populated
    info = api.update("base", {"k": "w", "huge": BIG}, ["labels.k"])
    assert dict(info.labels) == {"k": "w"}
    assert_refused(snapshotter, lambda: api.update("base", {"huge": BIG}, ["labels.huge"]), INVALID_ARGUMENT, "4096")
    assert dict(api.update("base", {"k": "y" * 4095}, ["labels.k"]).labels) == {"k": "y" * 4095}
    assert dict(api.update("base", {}, ["labels.k"]).labels) == {}


def test_empty_label_keys(populated, snapshotter):
    """containerd cannot store a label with an empty key (bolt refuses empty keys); one with no value is no label."""
    api = populated
    assert_refused(snapshotter, lambda: api.prepare("x", labels={"": "v"}), INVALID_ARGUMENT, "empty key")
    assert_refused(snapshotter, lambda: api.commit("x", "work", labels={"": "v"}), INVALID_ARGUMENT, "empty key")
    assert_refused(snapshotter, lambda: api.update("base", {"": "v"}, ["labels."]), INVALID_ARGUMENT, "empty key")
    api.prepare("x", labels={"": "", "a": "1"})
    assert dict(api.stat("x").labels) == {"a": "1"}


def test_immutable_fields_and_bad_namespace(populated, snapshotter):
    api = populated
    assert_refused(snapshotter, lambda: api.update("base", {"k": "w"}, ["labels.k", "parent"]), INVALID_ARGUMENT, "'parent'")
    assert api.stat("base").labels["k"] == "v"  # the valid part of the mask was not applied either
    assert_refused(snapshotter, lambda: api.prepare("x", ns="bad namespace!"), INVALID_ARGUMENT, "namespace")
    assert_refused(snapshotter, lambda: api.stub.Update(pb.UpdateSnapshotRequest(), timeout=10), INVALID_ARGUMENT, "name")
