"""Extended attributes over the FUSE view, and what they cost in requests.

overlayfs asks a lower layer for its own trusted.overlay.* attributes on lookups (metacopy on
every regular file, origin on directories): on an image without a single xattr that was one
GETXATTR round trip through the daemon per file a container touched. A view whose files have
no xattrs answers the first GETXATTR with ENOSYS and the kernel answers the rest itself
(EOPNOTSUPP, which overlayfs, the capability code and getcap read as "none"); a view with any
xattr answers every GETXATTR as before, so files with xattrs still report them.

In-process FuseSessions over small real views; readers run in a subprocess with a timeout, so
a regression cannot hang the suite."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zstandard

from layerstore.cache import ChunkCache
from layerstore.fetch import ChunkFetcher
from layerstore.layout import chunk_key
from layerstore.pb.liftoff.index.v1 import index_pb2
from layerstore.stores.file import FileStore
from snapshotter import fuse_kernel as k
from snapshotter.fuse_server import FuseSession, lazy_unmount
from snapshotter.fuse_tree import View

DATA = b"a file of the view\n" * 100
FILES = [f"f{i}".encode() for i in range(5)]
PROBE = """
import errno, json, os, sys
out = {}
for path in sys.argv[2:]:
    data = open(path, "rb").read() if os.path.isfile(path) else b""
    try:
        value = os.getxattr(path, sys.argv[1]).decode()
    except OSError as e:
        value = errno.errorcode[e.errno]
    out[os.path.basename(path)] = [value, sorted(os.listxattr(path)), len(data)]
print(json.dumps(out))
"""


def _view(store: FileStore, xattrs: dict[str, bytes] | None = None) -> View:
    """Files f0-f4 and a directory d in one layer; f0 carries `xattrs`."""
    index = index_pb2.LayerIndex(layer_digest="sha256:" + "ab" * 32)
    stored = zstandard.ZstdCompressor().compress(DATA)
    store.put(chunk_key(hashlib.sha256(DATA).digest()), stored)
    index.chunks.add(sha256=hashlib.sha256(DATA).digest(), size=len(DATA), stored_size=len(stored))
    index.entries.add(path=b"", type=index_pb2.ENTRY_TYPE_DIRECTORY, mode=0o755)
    index.entries.add(path=b"d", type=index_pb2.ENTRY_TYPE_DIRECTORY, mode=0o755)
    for name in FILES:
        entry = index.entries.add(path=name, type=index_pb2.ENTRY_TYPE_REGULAR, mode=0o644, size=len(DATA))
        entry.extents.add(chunk=0, offset=0, length=len(DATA))
        if name == b"f0" and xattrs:
            entry.xattrs.update(xattrs)
    return View([index])


@pytest.fixture
def serve(tmp_path):
    """serve(xattrs) -> (session, mount point) of a view whose f0 has `xattrs`."""
    pool = ThreadPoolExecutor(2)
    mounts: list[tuple[Path, FuseSession]] = []

    def start(xattrs: dict[str, bytes] | None) -> tuple[FuseSession, Path]:
        base = tmp_path / f"view{len(mounts)}"
        store = FileStore(base / "store")
        fetcher = ChunkFetcher([store], ChunkCache(base / "cache", 16 << 20), retry_seconds=2)
        session = FuseSession(_view(store, xattrs), fetcher, f"xattrs{len(mounts)}", pool)
        mountpoint = base / "mnt"
        mountpoint.mkdir(parents=True)
        session.mount(mountpoint)
        mounts.append((mountpoint, session))
        return session, mountpoint

    yield start
    for mountpoint, session in mounts:
        lazy_unmount(mountpoint)
        session._stopping = True
        os.close(session.fd)
    pool.shutdown(cancel_futures=True)


def probe(name: str, paths: list[Path]) -> dict:
    """For each path: [getxattr(name) or its errno name, listxattr, bytes read]."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", PROBE, name, *map(str, paths)], capture_output=True, text=True, timeout=20, check=True
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the probe hung")
    return json.loads(done.stdout)


def test_a_view_without_xattrs_is_asked_for_one_xattr_at_most(serve):
    session, mnt = serve(None)
    paths = [mnt / n.decode() for n in FILES] + [mnt / "d"]
    first = probe("trusted.overlay.metacopy", paths)
    second = probe("user.anything", paths)
    for result in (first, second):
        for name, (value, names, size) in result.items():
            assert value in ("ENODATA", errno.errorcode[errno.EOPNOTSUPP]), (name, value)  # both: no such attribute
            assert names == [] and size == (len(DATA) if name != "d" else 0)
    assert session.requests.get(k.GETXATTR, 0) == 1, session.requests  # ENOSYS once: the kernel answers the rest
    assert session.requests.get(k.LISTXATTR, 0) == 2 * len(paths)  # listxattr still asks: an empty list


def test_a_view_with_xattrs_still_reports_them(serve):
    session, mnt = serve({"user.origin": b"liftoff", "security.capability": b"\x01\x00\x00\x02" + bytes(16)})
    paths = [mnt / n.decode() for n in FILES] + [mnt / "d"]
    result = probe("user.origin", paths)
    assert result["f0"] == ["liftoff", ["security.capability", "user.origin"], len(DATA)]
    for name in ("f1", "f2", "f3", "f4", "d"):
        assert result[name][:2] == ["ENODATA", []], name
    assert session.requests.get(k.GETXATTR, 0) == len(paths)
    assert os.getxattr(mnt / "f0", "security.capability") == b"\x01\x00\x00\x02" + bytes(16)
    with pytest.raises(OSError) as missing:
        os.getxattr(mnt / "f1", "security.capability")
    assert missing.value.errno == errno.ENODATA


def test_overlayfs_over_a_view_without_xattrs_stops_asking(serve, tmp_path):
    """A container's overlay over the view: overlayfs's trusted.overlay.* questions reach the daemon
    once, and reads, a copy-up and a write work as on any lower layer."""
    session, mnt = serve(None)
    upper, work, merged = tmp_path / "upper", tmp_path / "work", tmp_path / "merged"
    for d in (upper, work, merged):
        d.mkdir()
    options = f"lowerdir={mnt},upperdir={upper},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], check=True)
    try:
        result = probe("trusted.overlay.metacopy", [merged / n.decode() for n in FILES] + [merged / "d"])
        assert all(size == len(DATA) for name, (_, _, size) in result.items() if name != "d")
        (merged / "d" / "new").write_bytes(b"written\n")  # copies d up
        with open(merged / "f1", "ab") as f:  # copies f1 up
            f.write(b"more\n")
        assert (merged / "f1").read_bytes() == DATA + b"more\n"
        assert (upper / "d" / "new").read_bytes() == b"written\n"
        assert (mnt / "f1").read_bytes() == DATA  # the view itself is unchanged
    finally:
        lazy_unmount(merged)
    assert session.requests.get(k.GETXATTR, 0) <= 1, session.requests
