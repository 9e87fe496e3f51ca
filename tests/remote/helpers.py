"""Helpers for the lazy-layer tests: containerd's Snapshots API for any snapshotter, the labelled
Prepare handshake, mounting a chain, and comparing trees."""

from __future__ import annotations

import functools
import os
import tempfile
import uuid
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc

from layerstore.pb.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from layerstore.pb.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from layerstore.pb.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.containerd_api import GC_EXPIRE_LABEL, LEASE_HEADER
from tests.snapshotter.helpers import mounted, tree

REF = "containerd.io/snapshot.ref"


class Snapshots:
    """containerd's Snapshots API (through containerd's socket) for one snapshotter and namespace.

    Everything created through it is held by a lease, as containerd's own clients hold what they
    create: containerd's garbage collector removes snapshots nothing references, and it may run at
    any moment (it did between a handshake and the Prepare on top of it, on a busy machine). The
    lease is deleted by close(), and expires on its own an hour later if close() never runs."""

    def __init__(self, address: str, snapshotter: str, namespace: str = "default") -> None:
        self.channel = grpc.insecure_channel(f"unix:{address}")
        self.stub = pb_grpc.SnapshotsStub(self.channel)
        self.leases = leases_pb2_grpc.LeasesStub(self.channel)
        self.snapshotter = snapshotter
        self.namespace_md = [("containerd-namespace", namespace)]
        until = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        request = leases_pb2.CreateRequest(id=f"test-{uuid.uuid4().hex}", labels={GC_EXPIRE_LABEL: until})
        self.lease = self.leases.Create(request, metadata=self.namespace_md, timeout=30).lease.id
        self.md = [*self.namespace_md, (LEASE_HEADER, self.lease)]

    def __enter__(self) -> Snapshots:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def prepare(self, key: str, parent: str = "", labels: dict | None = None):
        request = pb.PrepareSnapshotRequest(snapshotter=self.snapshotter, key=key, parent=parent, labels=labels or {})
        return list(self.stub.Prepare(request, metadata=self.md, timeout=60).mounts)

    def stat(self, key: str):
        return self.stub.Stat(pb.StatSnapshotRequest(snapshotter=self.snapshotter, key=key), metadata=self.md, timeout=30).info

    def remove(self, key: str) -> None:
        self.stub.Remove(pb.RemoveSnapshotRequest(snapshotter=self.snapshotter, key=key), metadata=self.md, timeout=60)

    def close(self) -> None:
        """Delete the lease (what it held is then garbage unless something else refers to it)."""
        try:
            self.leases.Delete(leases_pb2.DeleteRequest(id=self.lease), metadata=self.namespace_md, timeout=30)
        finally:
            self.channel.close()


def handshake(api: Snapshots, chain_ids: list[str], layer_digests: list[str] | None = None) -> list[grpc.StatusCode]:
    """Prepare each layer as containerd's unpacker does (labelled); returns each answer's code."""
    codes, parent = [], ""
    for i, chain_id in enumerate(chain_ids):
        labels = {REF: chain_id}
        if layer_digests:
            labels["containerd.io/snapshot/cri.layer-digest"] = layer_digests[i]
        try:
            api.prepare(f"extract-{uuid.uuid4().hex[:8]} {chain_id}", parent, labels)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.append(e.code())
        parent = chain_id
    return codes


@contextmanager
def mounted_chain(api: Snapshots, top: str, target: Path):
    """An active snapshot on `top`, mounted at `target` (removed afterwards)."""
    key = f"inspect-{uuid.uuid4().hex[:8]}"
    mounts = api.prepare(key, top)  # held by the api's lease
    try:
        with mounted(mounts, target) as path:
            yield path
    finally:
        api.remove(key)


def comparable(entries: dict[str, tuple]) -> dict[str, tuple]:
    """tree() without what legitimately differs between snapshotters: directory link counts
    (overlayfs reports 1 for merged directories) and the root's times."""
    out = {}
    for path, (mode, uid, gid, size, mtime, nlink, digest, link, rdev, xattrs) in entries.items():
        is_dir = (mode & 0o170000) == 0o040000
        out[path] = (mode, uid, gid, size, None if path == "." else mtime, None if is_dir else nlink, digest, link, rdev, xattrs)
    return out


__all__ = ["Snapshots", "comparable", "handshake", "mounted_chain", "tree"]


def kernel_release() -> tuple[int, int]:
    """This kernel's (major, minor) version."""
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


@functools.cache
def file_backed_erofs() -> str:
    """ "" where this machine mounts an EROFS image file (Linux 6.12+, an image on a disk file system, as
    the tests' temporary folders are); else why not. A one-directory image, mounted and unmounted."""
    from snapshotter.erofs_image import BlobLayout, write_image
    from snapshotter.fuse_server import lazy_unmount, mount_erofs
    from snapshotter.fuse_tree import View

    with tempfile.TemporaryDirectory(prefix="erofs-probe-") as top:
        view = View([])
        (Path(top) / "blob").write_bytes(b"")
        (Path(top) / "mnt").mkdir()
        write_image(view, BlobLayout(view), Path(top) / "probe.img")
        try:
            mount_erofs(Path(top) / "probe.img", Path(top) / "blob", Path(top) / "mnt")
        except OSError as e:
            return f"no file-backed EROFS here ({os.uname().release}, temporary folder {top}): {e.strerror}"
        lazy_unmount(Path(top) / "mnt")
    return ""


def erofs_mounts(root: Path) -> list[str]:
    """The EROFS mounts (views served as EROFS images) under a node's root."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[fields.index("-") + 1] == "erofs" and fields[4].startswith(str(root)):
                out.append(fields[4])
    return out
