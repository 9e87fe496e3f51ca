"""Debian's containerd using `liftoff` as its snapshotter: pull, run, ctr snapshot, GC, restart, and the same
filesystem tree and output as containerd's own overlayfs snapshotter."""

from __future__ import annotations

import json
import os
import shlex
import time
import uuid
from types import SimpleNamespace

import pytest

from layerstore.errors import LiftoffError
from tests.snapshotter.helpers import db_state, mounted, tree

NS = "lt"  # the containerd namespace of these tests: backend keys arrive as "lt/<seq>/<key>"

SCRIPT = "cat /etc/greeting; ls /etc; ls /opt/replaced; cat /data/link; /app/run.sh; id -u"
EXPECTED = "hello from layer 2\ngreeting\nnew\nhello from layer 2\napp says hi\n0\n"


def ctr(containerd, *args: str, **kwargs) -> str:
    return containerd.ctr(*args, namespace=NS, **kwargs)


def run(containerd, image, script: str, snapshotter: str = "liftoff") -> str:
    container = f"liftoff-test-{uuid.uuid4().hex[:10]}"
    return ctr(containerd, "run", "--rm", "--snapshotter", snapshotter, image.ref, container, "/bin/sh", "-c", script)


def snapshot_rows(containerd, snapshotter: str = "liftoff") -> dict[str, tuple[str, str]]:
    """`ctr snapshot ls` as {key: (parent, kind)}."""
    lines = ctr(containerd, "snapshot", "--snapshotter", snapshotter, "ls").splitlines()[1:]
    rows = {}
    for line in lines:
        fields = line.split()
        key, kind = fields[0], fields[-1]
        rows[key] = (fields[1] if len(fields) == 3 else "", kind)
    return rows


def usage_bytes(containerd, snapshotter: str) -> dict[str, tuple[int, int]]:
    rows = ctr(containerd, "snapshot", "--snapshotter", snapshotter, "usage", "-b").splitlines()[1:]
    return {key: (int(size), int(inodes)) for key, size, inodes in (r.split() for r in rows)}


def wait_until(condition, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting {timeout:.0f} s for {what}")
        time.sleep(0.05)


@pytest.fixture
def pulled(containerd, app_image):
    ctr(containerd, "image", "pull", "--plain-http", "--snapshotter", "liftoff", app_image.ref)
    return app_image


def test_pull_unpacks_the_layer_chain(containerd, snapshotter, pulled):
    rows = snapshot_rows(containerd)
    chain = pulled.chain_ids
    for i, chain_id in enumerate(chain):
        assert rows[chain_id] == (chain[i - 1] if i else "", "Committed")
    db_rows, _ = db_state(snapshotter.root)
    backend = {key.split("/", 2)[2]: (sid, ns, key) for sid, ns, key, *_ in db_rows if key.startswith(f"{NS}/")}
    for chain_id in chain:
        assert backend[chain_id][1] == NS  # taken from the key prefix: Debian's containerd sends no namespace header here
    base_fs = snapshotter.root / "snapshots" / str(backend[chain[0]][0]) / "fs"
    assert (base_fs / "bin" / "busybox").stat().st_size == os.path.getsize("/bin/busybox")
    changes_fs = snapshotter.root / "snapshots" / str(backend[chain[1]][0]) / "fs"
    assert os.stat(changes_fs / "etc" / "remove-me").st_rdev == 0  # the whiteout as overlay's 0/0 device
    assert os.getxattr(changes_fs / "opt" / "replaced", "trusted.overlay.opaque") == b"y"


def test_run_prints_the_expected_output(containerd, pulled):
    assert run(containerd, pulled, SCRIPT) == EXPECTED
    assert set(snapshot_rows(containerd)) >= set(pulled.chain_ids)
    assert all(kind == "Committed" for _, kind in snapshot_rows(containerd).values())  # --rm removed the container's


def layer_trees(snapshotter) -> dict[int, dict]:
    """The trees of every committed snapshot's fs, by id (containerd removes containers' snapshots lazily, in GC)."""
    committed = [r[0] for r in db_state(snapshotter.root)[0] if r[3] == 3]
    return {sid: tree(snapshotter.root / "snapshots" / str(sid) / "fs") for sid in committed}


def test_container_writes_stay_in_that_container(containerd, snapshotter, pulled):
    before = layer_trees(snapshotter)
    out = run(containerd, pulled, "echo secret > /data/written; rm /etc/greeting; echo more >> /app/run.sh; ls /data/written")
    assert out == "/data/written\n"
    out = run(containerd, pulled, "ls /data; cat /etc/greeting; cat /app/run.sh")
    assert "written" not in out.split()
    assert out.endswith("hello from layer 2\n#!/bin/sh\necho app says hi\n")
    assert layer_trees(snapshotter) == before, "a container's writes reached a committed layer"


def test_ctr_snapshot_ls_info_usage_prepare_mounts_rm(containerd, snapshotter, pulled, tmp_path):
    top = pulled.chain_ids[-1]
    info = json.loads(ctr(containerd, "snapshot", "--snapshotter", "liftoff", "info", top))
    assert (info["Kind"], info["Name"], info["Parent"]) == ("Committed", top, pulled.chain_ids[-2])

    usage = usage_bytes(containerd, "liftoff")
    db_rows, _ = db_state(snapshotter.root)
    by_chain = {key.split("/", 2)[2]: (sid, size, inodes) for sid, ns, key, _k, _p, _c, _u, size, inodes in db_rows if ns == NS}
    for chain_id in pulled.chain_ids:
        sid, size, inodes = by_chain[chain_id]
        fs = snapshotter.root / "snapshots" / str(sid) / "fs"
        walked = {(os.lstat(p).st_dev, os.lstat(p).st_ino): os.lstat(p).st_blocks * 512 for p in [fs, *fs.rglob("*")]}
        assert usage[chain_id] == (size, inodes) == (sum(walked.values()), len(walked))
    assert usage[pulled.chain_ids[-1]][0] > 300_000  # the app layer holds a 300 kB file

    ctr(containerd, "snapshot", "--snapshotter", "liftoff", "prepare", "by-hand", top)
    assert snapshot_rows(containerd)["by-hand"] == (top, "Active")
    printed = ctr(containerd, "snapshot", "--snapshotter", "liftoff", "mounts", str(tmp_path / "t"), "by-hand")
    argv = shlex.split(printed)
    assert argv[:5] == ["mount", "-t", "overlay", "overlay", str(tmp_path / "t")]
    options = argv[6].split(",")
    upper = next(o for o in options if o.startswith("upperdir=")).split("=", 1)[1]
    lowers = next(o for o in options if o.startswith("lowerdir=")).split("=", 1)[1].split(":")
    assert [by_chain[c][0] for c in reversed(pulled.chain_ids)] == [int(p.split("/")[-2]) for p in lowers]
    mounts = [SimpleNamespace(type="overlay", source="overlay", options=options)]
    with mounted(mounts, tmp_path / "t") as root:
        (root / "by-hand-file").write_text("x")
        assert (root / "etc" / "greeting").read_text() == "hello from layer 2\n"
    assert usage_bytes(containerd, "liftoff")["by-hand"][1] == 2  # upper dir root + the new file
    ctr(containerd, "snapshot", "--snapshotter", "liftoff", "rm", "by-hand")
    assert "by-hand" not in snapshot_rows(containerd)
    wait_until(lambda: not os.path.exists(upper), "containerd's GC to remove the snapshot from liftoff")


def unpack_times_masked(entries: dict[str, tuple], unpacked_after_ns: int) -> dict[str, tuple]:
    """Directories no layer tar lists (the top layer's root, parents made implicitly) get the time of the
    unpack as mtime, in any snapshotter: mark those instead of comparing two unpacks' clocks."""
    limit = max(unpacked_after_ns, time.time_ns() - 600 * 10**9)
    return {k: (*v[:4], "unpack time" if v[4] > limit else v[4], *v[5:]) for k, v in entries.items()}


def test_same_tree_output_and_usage_as_overlayfs(containerd, pulled, tmp_path):
    started = time.time_ns()
    ctr(containerd, "image", "pull", "--plain-http", "--snapshotter", "overlayfs", pulled.ref)
    trees = {}
    for name in ("liftoff", "overlayfs"):
        # `ctr snapshot view` makes no GC root, so containerd may collect the view at once: prepare instead
        key = f"compare-{name}-{uuid.uuid4().hex[:6]}"
        printed = ctr(containerd, "snapshot", "--snapshotter", name, "prepare", "--mounts", key, pulled.chain_ids[-1])
        mounts = [SimpleNamespace(**{k.lower(): v for k, v in m.items()}) for m in json.loads(printed)]
        assert mounts[0].type == "overlay"
        with mounted(mounts, tmp_path / name) as root:
            trees[name] = unpack_times_masked(tree(root), started if name == "overlayfs" else 0)
        ctr(containerd, "snapshot", "--snapshotter", name, "rm", key)
    assert len(trees["liftoff"]) > 30
    assert "etc/remove-me" not in trees["liftoff"] and "opt/replaced/old-a" not in trees["liftoff"]
    assert trees["liftoff"] == trees["overlayfs"]
    assert sorted(k for k, v in trees["liftoff"].items() if v[4] == "unpack time") == [".", "opt"]

    listing = "ls -lnaR /etc /opt /data /app /bin; sha256sum /app/big /bin/busybox; cat /data/link"
    assert run(containerd, pulled, listing) == run(containerd, pulled, listing, snapshotter="overlayfs")
    assert run(containerd, pulled, SCRIPT, snapshotter="overlayfs") == EXPECTED

    ours, theirs = usage_bytes(containerd, "liftoff"), usage_bytes(containerd, "overlayfs")
    for chain_id in pulled.chain_ids:
        assert ours[chain_id] == theirs[chain_id], chain_id


def test_restart_between_runs(containerd, snapshotter, pulled):
    assert run(containerd, pulled, SCRIPT) == EXPECTED
    rows = snapshot_rows(containerd)
    assert snapshotter.stop() == 0
    with pytest.raises(LiftoffError):
        ctr(containerd, "snapshot", "--snapshotter", "liftoff", "ls")  # really down
    snapshotter.start()
    deadline = time.monotonic() + 30
    while True:  # containerd's gRPC client reconnects with backoff
        try:
            after = snapshot_rows(containerd)
            break
        except LiftoffError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert after == rows
    assert run(containerd, pulled, SCRIPT) == EXPECTED


def test_image_removal_and_gc_leave_no_orphans(containerd, snapshotter, pulled, small_image):
    ctr(containerd, "image", "pull", "--plain-http", "--snapshotter", "liftoff", small_image.ref)
    assert small_image.chain_ids[0] == pulled.chain_ids[0]  # the base layer is shared
    assert run(containerd, small_image, "cat /etc/tag") == "small\n"
    planted = snapshotter.root / "snapshots" / "987654321"
    (planted / "fs").mkdir(parents=True)

    ctr(containerd, "image", "rm", "--sync", small_image.ref)
    rows = snapshot_rows(containerd)
    assert small_image.chain_ids[1] not in rows
    assert set(pulled.chain_ids) <= set(rows)  # still used by the app image
    assert not planted.exists()  # containerd's GC called Cleanup

    ctr(containerd, "image", "rm", "--sync", pulled.ref)
    assert snapshot_rows(containerd) == {}
    ours = [r for r in db_state(snapshotter.root)[0] if r[1] == NS]
    assert ours == []
    owned = {str(r[0]) for r in db_state(snapshotter.root)[0]}
    assert set(os.listdir(snapshotter.root / "snapshots")) == owned
