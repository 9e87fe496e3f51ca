"""The semantics of containerd's snapshotter test suite (snapshots/testsuite), through gRPC against a real
`liftoff snapshotter` process, with the returned mounts mounted by the kernel."""

from __future__ import annotations

import errno
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import requests

from layerstore.pb.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from tests.snapshotter.helpers import code_of, db_state, mounted

NOT_FOUND = grpc.StatusCode.NOT_FOUND
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT


def write(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_commit_chain_through_real_mounts(api, snapshotter, tmp_path):
    # no parent: a plain rw bind mount of the snapshot's own fs
    mounts = api.prepare("base-active")
    assert [(m.type, list(m.options)) for m in mounts] == [("bind", ["rw", "rbind"])]
    with mounted(mounts, tmp_path / "m1") as root:
        write(root, {"a": b"A", "dir/b": b"B", "dir/c": b"C"})
        os.chown(root, 1234, 4321)  # a child's fs root takes this owner
    api.commit("base", "base-active", labels={"layer": "1"})

    # one parent, active: overlay with upper/work over the parent's lower dir
    mounts = api.prepare("second-active", parent="base")
    (mount,) = mounts
    assert mount.type == "overlay"
    options = list(mount.options)
    assert options[-1].startswith("lowerdir=") and any(o.startswith("upperdir=") for o in options)
    assert any(o.startswith("workdir=") for o in options)
    assert ("index=off" in options) == os.path.exists("/sys/module/overlay/parameters/index")
    assert "userxattr" not in options  # only needed in a user namespace
    with mounted(mounts, tmp_path / "m2") as root:
        assert (root / "a").read_bytes() == b"A"
        assert (os.stat(root).st_uid, os.stat(root).st_gid) == (1234, 4321)
        (root / "a").unlink()
        (root / "dir" / "b").write_bytes(b"B2")
        write(root, {"new": b"N"})
    api.commit("second", "second-active")

    # two parents: the child sees the whole chain, deletions included
    with mounted(api.prepare("third-active", parent="second"), tmp_path / "m3") as root:
        seen = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        assert seen == {"dir/b": b"B2", "dir/c": b"C", "new": b"N"}

    # the committed layers themselves are untouched by their children's writes
    with mounted(api.view("base-view", parent="base"), tmp_path / "m4") as root:
        assert sorted(p.name for p in root.iterdir()) == ["a", "dir"]
        assert (root / "dir" / "b").read_bytes() == b"B"

    third = api.stat("third-active")
    assert (third.kind, third.parent) == (pb.ACTIVE, "second")
    second = api.stat("second")
    assert (second.kind, second.parent, dict(second.labels)) == (pb.COMMITTED, "base", {})
    base = api.stat("base")
    assert (base.kind, base.parent, dict(base.labels)) == (pb.COMMITTED, "", {"layer": "1"})
    assert base.created_at.ToNanoseconds() <= second.created_at.ToNanoseconds() <= third.created_at.ToNanoseconds()
    assert third.updated_at == third.created_at
    assert code_of(api.stat, "base-active")[0] == NOT_FOUND  # a committed active key is gone


def test_views_are_read_only(api, tmp_path):
    api.prepare("l1-active")
    api.commit("l1", "l1-active")
    api.prepare("l2-active", parent="l1")
    api.commit("l2", "l2-active")

    no_parent = api.view("empty-view")
    assert [(m.type, list(m.options)) for m in no_parent] == [("bind", ["ro", "rbind"])]
    one = api.view("view-1", parent="l1")
    assert [(m.type, list(m.options)) for m in one] == [("bind", ["ro", "rbind"])]
    two = api.view("view-2", parent="l2")
    (mount,) = two
    assert mount.type == "overlay" and not any(o.startswith(("upperdir=", "workdir=")) for o in mount.options)
    assert mount.options[-1].count(":") == 1  # lowerdir=<l2>:<l1>, nearest first

    for i, mounts in enumerate([no_parent, one, two]):
        with mounted(mounts, tmp_path / f"v{i}") as root:
            with pytest.raises(OSError) as error:
                (root / "x").write_bytes(b"x")
            assert error.value.errno == errno.EROFS

    assert api.stat("view-2").kind == pb.VIEW
    assert list(api.mounts("view-2")) == two
    assert code_of(api.commit, "view-committed", "view-2")[0] == FAILED_PRECONDITION
    assert code_of(api.mounts, "l1")[0] == FAILED_PRECONDITION


def test_remove_refuses_snapshots_with_children(api, snapshotter):
    api.prepare("p-active")
    api.commit("p", "p-active")
    api.prepare("child", parent="p")
    api.view("child-view", parent="p")
    sid = next(row[0] for row in db_state(snapshotter.root)[0] if row[2] == "p" and row[1] == api.namespace)

    code, message = code_of(api.remove, "p")
    assert code == FAILED_PRECONDITION and "children" in message
    assert api.stat("p").kind == pb.COMMITTED
    assert (snapshotter.root / "snapshots" / str(sid) / "fs").is_dir()

    api.remove("child")
    assert code_of(api.remove, "p")[0] == FAILED_PRECONDITION
    api.remove("child-view")
    api.remove("p")
    assert code_of(api.stat, "p")[0] == NOT_FOUND
    assert not (snapshotter.root / "snapshots" / str(sid)).exists()
    assert not [n for n in os.listdir(snapshotter.root / "snapshots") if n.startswith(("rm-", "new-"))]


def test_double_commit_and_unknown_keys(api):
    api.prepare("active")
    api.prepare("other")
    api.commit("done", "active")
    assert code_of(api.commit, "done-again", "active")[0] == NOT_FOUND  # the active key no longer exists
    assert code_of(api.commit, "done", "other")[0] == ALREADY_EXISTS  # the name is taken
    assert code_of(api.commit, "done2", "done")[0] == FAILED_PRECONDITION  # committed, not active
    assert code_of(api.prepare, "other")[0] == ALREADY_EXISTS
    assert code_of(api.view, "done")[0] == ALREADY_EXISTS

    for call, args in [
        (api.stat, ("nope",)),
        (api.mounts, ("nope",)),
        (api.usage, ("nope",)),
        (api.remove, ("nope",)),
        (api.commit, ("x", "nope")),
        (api.update, ("nope", {"a": "b"})),
    ]:
        code, message = code_of(call, *args)
        assert code == NOT_FOUND and "'nope'" in message, (call, message)
    code, message = code_of(api.prepare, "child", parent="missing-parent")
    assert code == NOT_FOUND and "parent" in message and "'missing-parent'" in message
    code, message = code_of(api.prepare, "child", parent="other")
    assert code == INVALID_ARGUMENT and "committed" in message  # an active parent


def test_update_labels_with_field_masks(api):
    api.prepare("u-active", labels={"keep": "1", "drop": "2"})
    api.commit("u", "u-active", labels={"keep": "1", "drop": "2"})
    before = api.stat("u")
    time.sleep(0.01)

    info = api.update("u", {"added": "3"}, ["labels.added"])
    assert dict(info.labels) == {"keep": "1", "drop": "2", "added": "3"}
    assert info.updated_at.ToNanoseconds() > before.updated_at.ToNanoseconds()
    assert info.created_at == before.created_at
    info = api.update("u", {}, ["labels.drop"])  # a masked label without a value is removed
    assert dict(info.labels) == {"keep": "1", "added": "3"}
    info = api.update("u", {"only": "this"}, ["labels"])
    assert dict(info.labels) == {"only": "this"}
    info = api.update("u", {"no": "mask"})  # no mask: every mutable field, i.e. all labels
    assert dict(info.labels) == {"no": "mask"}
    assert dict(api.stat("u").labels) == {"no": "mask"}

    for immutable in ("name", "parent", "kind", "created_at"):
        code, message = code_of(api.update, "u", {"x": "y"}, [immutable])
        assert code == INVALID_ARGUMENT and immutable in message
    assert dict(api.stat("u").labels) == {"no": "mask"}


def test_list_filters_and_namespaces(api, snapshotter):
    api.prepare("a-active", labels={"containerd.io/snapshot.ref": "sha256:aaa"})
    api.commit("a", "a-active", labels={"containerd.io/snapshot.ref": "sha256:aaa", "tier": "base"})
    api.prepare("b-active", parent="a")
    api.commit("b", "b-active", labels={"tier": "app"})
    api.prepare("c", parent="b")
    api.view("v", parent="b")

    assert api.names() == {"a", "b", "c", "v"}
    assert api.names("kind==committed") == {"a", "b"}
    assert api.names("kind==active", "kind==view") == {"c", "v"}
    assert api.names("parent==b") == {"c", "v"}
    assert api.names('labels."containerd.io/snapshot.ref"==sha256:aaa,parent==""') == {"a"}
    assert api.names('labels."containerd.io/snapshot.ref"==sha256:aaa,parent==b') == set()
    assert api.names("labels.tier") == {"a", "b"}
    assert api.names("labels.tier!=base") == {"b", "c", "v"}
    assert api.names("name~=^[ab]$") == {"a", "b"}
    assert api.names("name~=/^(c|v)$/") == {"c", "v"}
    assert api.names(r"name~=|^(c\|v)$|") == {"c", "v"}  # inside |...| quotes a | is escaped
    assert code_of(api.list, "name~=|^(c|v)$|")[0] == INVALID_ARGUMENT
    info = next(i for i in api.list("name==b"))
    assert (info.kind, info.parent, dict(info.labels)) == (pb.COMMITTED, "a", {"tier": "app"})

    # keys are unique per namespace; List with a namespace header sees only that namespace
    other = snapshotter.client(api.namespace + "-other")
    other.prepare("a")
    assert other.names() == {"a"}
    assert api.stat("a").kind == pb.COMMITTED and other.stat("a").kind == pb.ACTIVE
    # without the header the namespace comes from containerd's "<ns>/<seq>/" key prefix, and List sees all
    bare = snapshotter.client(None)
    bare.prepare(f"{api.namespace}/7/from-prefix")
    assert f"{api.namespace}/7/from-prefix" in api.names()
    assert {"a", "b", "c", "v", f"{api.namespace}/7/from-prefix"} <= bare.names()
    other.close()
    bare.close()


def test_list_streams_in_batches(api):
    labels = {f"label-{i}": "v" * 3000 for i in range(4)}
    for i in range(230):
        api.view(f"view-{i:03d}", labels=labels)
    batches = api.list_batches()
    assert sum(len(b) for b in batches) == 230
    assert len(batches) >= 3
    assert all(sum(info.ByteSize() for info in b) < 16 << 20 for b in batches)


def test_usage_counts_size_and_inodes(api, tmp_path):
    mounts = api.prepare("usage-active")
    with mounted(mounts, tmp_path / "m") as root:
        write(root, {"one-mib": os.urandom(1 << 20), "sub/64k": os.urandom(64 << 10), "empty": b""})
        os.link(root / "one-mib", root / "sub" / "hardlink")
        os.symlink("one-mib", root / "symlink")
        expected_size = sum(os.lstat(p).st_blocks * 512 for p in {root, *root.rglob("*")} if p.name != "hardlink")
    # root, one-mib (+ its hard link), sub, 64k, empty, symlink
    assert api.usage("usage-active") == (expected_size, 6)
    assert expected_size >= (1 << 20) + (64 << 10)
    api.commit("usage", "usage-active")
    assert api.usage("usage") == (expected_size, 6)  # measured once at commit, stored
    view = api.view("usage-view", parent="usage")
    assert view and api.usage("usage-view") == (0, 0)

    child_mounts = api.prepare("usage-child", parent="usage")
    assert api.usage("usage-child")[1] == 1  # only its own (empty) upper dir
    with mounted(child_mounts, tmp_path / "c") as root:
        (root / "grown").write_bytes(os.urandom(8192))
    size, inodes = api.usage("usage-child")
    assert inodes == 2 and size >= 8192  # active snapshots are measured live


def test_concurrent_prepares(api, snapshotter):
    api.prepare("base-active")
    api.commit("base", "base-active")
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: api.prepare(f"c-{i}", parent="base"), range(48)))
    assert len(results) == 48
    upper_dirs = {next(o for o in r[0].options if o.startswith("upperdir=")) for r in results}
    assert len(upper_dirs) == 48

    barrier = threading.Barrier(12)

    def same_key(_):
        barrier.wait()
        try:
            api.prepare("contended", parent="base")
            return "ok"
        except grpc.RpcError as e:
            return e.code()

    with ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(same_key, range(12)))
    assert outcomes.count("ok") == 1 and outcomes.count(ALREADY_EXISTS) == 11
    rows = [r for r in db_state(snapshotter.root)[0] if r[1] == api.namespace]
    assert len(rows) == 1 + 48 + 1
    for row in rows:
        assert (snapshotter.root / "snapshots" / str(row[0]) / "fs").is_dir()


def test_cleanup_removes_only_unowned_directories(api, snapshotter):
    api.prepare("kept")
    snapshots = snapshotter.root / "snapshots"
    owned = set(os.listdir(snapshots))
    for name in ("999999", "rm-999998-dead", "new-interrupted", "stray"):
        (snapshots / name / "fs").mkdir(parents=True)
        (snapshots / name / "fs" / "file").write_bytes(b"x")
    api.cleanup()
    assert set(os.listdir(snapshots)) == owned
    assert api.stat("kept").kind == pb.ACTIVE


def test_new_snapshot_directories_match_containerd_overlayfs(api, snapshotter):
    api.prepare("perm")
    sid = next(r[0] for r in db_state(snapshotter.root)[0] if r[1] == api.namespace and r[2] == "perm")
    directory = snapshotter.root / "snapshots" / str(sid)
    assert oct(os.stat(directory / "fs").st_mode & 0o7777) == oct(0o755)
    assert oct(os.stat(directory / "work").st_mode & 0o7777) == oct(0o711)
    assert oct(os.stat(snapshotter.root / "snapshots").st_mode & 0o777) == oct(0o700)
    api.view("perm-view")
    vid = next(r[0] for r in db_state(snapshotter.root)[0] if r[1] == api.namespace and r[2] == "perm-view")
    assert not (snapshotter.root / "snapshots" / str(vid) / "work").exists()


def test_metrics_count_requests_by_method_and_code(api, snapshotter):
    api.prepare("metered")
    code_of(api.stat, "not-there")
    text = requests.get(f"http://127.0.0.1:{snapshotter.metrics_port}/metrics", timeout=5).text
    assert 'liftoff_snapshotter_requests_total{code="OK",method="Prepare"}' in text
    assert 'liftoff_snapshotter_requests_total{code="NOT_FOUND",method="Stat"}' in text
    assert 'liftoff_snapshotter_request_duration_seconds_bucket{le="0.005",method="Prepare"}' in text
