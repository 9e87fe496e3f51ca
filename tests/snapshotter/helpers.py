"""Helpers for the snapshotter tests: a gRPC client, mounting Mounts, walking trees, test images."""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import stat
import subprocess
from contextlib import contextmanager
from pathlib import Path

import grpc

from layerstore.pb.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from layerstore.pb.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from liftoff.devstack.ocibuild import Member, make_tar

BUSYBOX = Path("/bin/busybox")
APPLETS = ["sh", "ls", "cat", "echo", "rm", "find", "sort", "stat", "mkdir", "touch", "sha256sum", "id", "sleep"]


class SnapshotsClient:
    """Calls the Snapshots API over the snapshotter's socket, in one namespace (header) unless told otherwise."""

    def __init__(self, socket_path: Path, namespace: str | None = "test") -> None:
        self.channel = grpc.insecure_channel(f"unix:{socket_path}")
        self.stub = pb_grpc.SnapshotsStub(self.channel)
        self.namespace = namespace

    def _md(self, namespace: str | None = ...) -> list[tuple[str, str]]:
        ns = self.namespace if namespace is ... else namespace
        return [("containerd-namespace", ns)] if ns else []

    def prepare(self, key: str, parent: str = "", labels: dict | None = None, ns=...) -> list:
        req = pb.PrepareSnapshotRequest(snapshotter="liftoff", key=key, parent=parent, labels=labels or {})
        return list(self.stub.Prepare(req, metadata=self._md(ns), timeout=30).mounts)

    def view(self, key: str, parent: str = "", labels: dict | None = None, ns=...) -> list:
        req = pb.ViewSnapshotRequest(snapshotter="liftoff", key=key, parent=parent, labels=labels or {})
        return list(self.stub.View(req, metadata=self._md(ns), timeout=30).mounts)

    def mounts(self, key: str, ns=...) -> list:
        return list(self.stub.Mounts(pb.MountsRequest(key=key), metadata=self._md(ns), timeout=30).mounts)

    def commit(self, name: str, key: str, labels: dict | None = None, ns=...) -> None:
        req = pb.CommitSnapshotRequest(name=name, key=key, labels=labels or {})
        self.stub.Commit(req, metadata=self._md(ns), timeout=30)

    def remove(self, key: str, ns=...) -> None:
        self.stub.Remove(pb.RemoveSnapshotRequest(key=key), metadata=self._md(ns), timeout=30)

    def stat(self, key: str, ns=...) -> pb.Info:
        return self.stub.Stat(pb.StatSnapshotRequest(key=key), metadata=self._md(ns), timeout=30).info

    def update(self, name: str, labels: dict, paths: list[str] | None = None, ns=...) -> pb.Info:
        req = pb.UpdateSnapshotRequest(info=pb.Info(name=name, labels=labels))
        if paths is not None:
            req.update_mask.paths.extend(paths)
        return self.stub.Update(req, metadata=self._md(ns), timeout=30).info

    def list_batches(self, *filters: str, ns=...) -> list[list[pb.Info]]:
        stream = self.stub.List(pb.ListSnapshotsRequest(filters=list(filters)), metadata=self._md(ns), timeout=30)
        return [list(message.info) for message in stream]

    def list(self, *filters: str, ns=...) -> list[pb.Info]:
        return [info for batch in self.list_batches(*filters, ns=ns) for info in batch]

    def names(self, *filters: str, ns=...) -> set[str]:
        return {info.name for info in self.list(*filters, ns=ns)}

    def usage(self, key: str, ns=...) -> tuple[int, int]:
        r = self.stub.Usage(pb.UsageRequest(key=key), metadata=self._md(ns), timeout=30)
        return r.size, r.inodes

    def cleanup(self) -> None:
        self.stub.Cleanup(pb.CleanupRequest(), metadata=self._md(), timeout=30)

    def close(self) -> None:
        self.channel.close()


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message a call fails with (AssertionError if it succeeds)."""
    try:
        call(*args, **kwargs)
    except grpc.RpcError as e:
        return e.code(), e.details()
    raise AssertionError(f"{getattr(call, '__name__', call)}{args} succeeded; expected an error")


@contextmanager
def mounted(mounts, target: Path):
    """Mount containerd Mount messages (bind or overlay) on `target` with mount(8); unmount afterwards."""
    target.mkdir(parents=True, exist_ok=True)
    assert len(mounts) == 1, mounts
    m = mounts[0]
    options = list(m.options)
    if m.type == "bind":
        subprocess.run(["mount", "--rbind", m.source, str(target)], check=True)
        if "ro" in options:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
    else:
        subprocess.run(["mount", "-t", m.type, m.source, str(target), "-o", ",".join(options)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", "-R", str(target)], check=True)


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under `root` with its type, mode, owner, size, mtime, content digest, link target, rdev, xattrs."""
    entries = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [".", *dirnames, *filenames]:
            if name == "." and dirpath != str(root):
                continue
            path = os.path.join(dirpath, name) if name != "." else dirpath
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            digest = link = None
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                link = os.readlink(path)
            xattrs = {}
            if not stat.S_ISLNK(st.st_mode):
                for attr in sorted(os.listxattr(path, follow_symlinks=False)):
                    if not attr.startswith("trusted.overlay."):
                        xattrs[attr] = os.getxattr(path, attr, follow_symlinks=False)
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
            entries[rel] = (st.st_mode, st.st_uid, st.st_gid, size, st.st_mtime_ns, st.st_nlink, digest, link, st.st_rdev, xattrs)
    return entries


def db_state(root: Path) -> tuple[list, list]:
    """Every snapshot and label row of a snapshotter's database (read-only connection)."""
    conn = sqlite3.connect(f"file:{root / 'metadata.db'}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT * FROM snapshots ORDER BY id").fetchall()
        labels = conn.execute("SELECT * FROM labels ORDER BY snapshot_id, key").fetchall()
    finally:
        conn.close()
    return rows, labels


def disk_state(root: Path) -> list[str]:
    """Relative paths of everything under the snapshotter's snapshots/ directory."""
    base = root / "snapshots"
    return sorted(str(p.relative_to(base)) for p in base.rglob("*"))


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI chain IDs of a layer stack (what containerd names committed layer snapshots)."""
    chain = [diff_ids[0]]
    for diff_id in diff_ids[1:]:
        chain.append("sha256:" + hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest())
    return chain


def diff_id(tar: bytes) -> str:
    return "sha256:" + hashlib.sha256(tar).hexdigest()


def base_layer() -> bytes:
    """busybox with applet links, some files, a directory the next layer makes opaque (same bytes every call)."""
    busybox = BUSYBOX.read_bytes()
    return make_tar(
        [
            Member("bin", "dir"),
            Member("bin/busybox", data=busybox, mode=0o755),
            *[Member(f"bin/{a}", "symlink", linkname="busybox") for a in APPLETS],
            Member("etc", "dir"),
            Member("etc/greeting", data=b"hello from layer 1\n"),
            Member("etc/remove-me", data=b"gone in layer 2\n"),
            Member("opt", "dir"),
            Member("opt/replaced", "dir"),
            Member("opt/replaced/old-a", data=b"old a\n"),
            Member("opt/replaced/old-b", data=b"old b\n"),
            Member("data", "dir", uid=1000, gid=1000, mode=0o775),
            Member("tmp", "dir", mode=0o1777),
        ]
    )


def app_layers() -> list[bytes]:
    """Three layers: busybox base; changes with whiteouts, an opaque dir, links, xattrs, a fifo; an app layer."""
    base = base_layer()
    changes = make_tar(
        [
            Member("etc", "dir"),
            Member("etc/greeting", data=b"hello from layer 2\n", mtime_ns=1_650_000_000_123_456_789),
            Member("etc/.wh.remove-me"),
            Member("opt/replaced", "dir", mode=0o750),
            Member("opt/replaced/.wh..wh..opq"),
            Member("opt/replaced/new", data=b"new\n"),
            Member("data", "dir", uid=1000, gid=1000, mode=0o775),
            Member("data/hard", data=b"linked twice\n", uid=1000, gid=1000),
            Member("data/hardlink", "hardlink", linkname="data/hard"),
            Member("data/link", "symlink", linkname="../etc/greeting"),
            Member("data/private", "dir", mode=0o700, uid=1000, gid=1000, mtime_ns=1_600_000_000_987_654_321),
            Member("data/private/secret", data=b"s3cret\n", mode=0o600, uid=1000, gid=1000),
            Member("data/tagged", data=b"xattr\n", xattrs={"user.liftoff": b"tagged"}),
            Member("data/pipe", "fifo"),
        ]
    )
    app = make_tar(
        [
            Member("app", "dir"),
            Member("app/run.sh", data=b"#!/bin/sh\necho app says hi\n", mode=0o755),
            Member("app/big", data=random.Random(7).randbytes(300_000)),
            Member("dev", "dir"),
            Member("dev/zero2", "char", devmajor=1, devminor=5, mode=0o666),
        ]
    )
    return [base, changes, app]


def small_layers(tag: str) -> list[bytes]:
    """Two layers: the app image's base layer (a shared snapshot) and one file."""
    top = make_tar([Member("etc", "dir"), Member("etc/tag", data=f"{tag}\n".encode())])
    return [base_layer(), top]
