"""EROFS views (Linux 6.12+, file-backed EROFS): the view's tree as an EROFS metadata image the kernel
serves itself, its file bytes read from a FUSE blob. The tree a reader sees equals the FUSE view's,
entry by entry (the FUSE view is checked against containerd's overlayfs in test_conformance.py,
which also runs a daemon with --erofs); the blob's padding reads as zeros; what EROFS cannot hold
is refused with a clear error; a daemon whose kernel cannot mount EROFS serves FUSE views.

In-process FuseSessions over real views (chunks in a file store); readers run in a subprocess with
a timeout, so a regression cannot hang the suite."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from layerstore.cache import ChunkCache
from layerstore.fetch import ChunkFetcher
from layerstore.index import FORMAT_MAJOR
from layerstore.layout import chunk_key
from layerstore.pb.liftoff.index.v1 import index_pb2 as pb
from layerstore.stores.file import FileStore
from snapshotter.erofs_image import BLOCK, BlobLayout, ErofsUnsupported, build_image, write_image
from snapshotter.fuse_blob import BlobView
from snapshotter.fuse_control import view_id
from snapshotter.fuse_server import FuseSession, lazy_unmount, mount_erofs
from snapshotter.fuse_tree import View
from snapshotter.fused import views as views_module
from snapshotter.fused.indexes import IndexDir
from snapshotter.fused.views import Views, ViewSpec
from tests.remote.helpers import file_backed_erofs

needs_erofs = pytest.mark.skipif(bool(file_backed_erofs()), reason=file_backed_erofs() or "-")

SMALL = b"root:x:0:0:root:/root:/bin/sh\n" * 3
BIG_A = bytes(range(256)) * 4096  # 1 MiB
BIG_B = b"the tail of a two-chunk library\n" * 3000
TREE = """
import hashlib, json, os, stat, sys
out = {}
for top in sys.argv[1:]:
    entries = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [".", *dirnames, *filenames]:
            path = os.path.join(dirpath, name) if name != "." else dirpath
            if name == "." and dirpath != top:
                continue
            st = os.lstat(path)
            item = [st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_nlink, st.st_rdev]
            if not stat.S_ISDIR(st.st_mode):
                item.append(st.st_size)
            if stat.S_ISREG(st.st_mode):
                item.append(hashlib.sha256(open(path, "rb").read()).hexdigest())
            if stat.S_ISLNK(st.st_mode):
                item.append(os.fsencode(os.readlink(path)).hex())
            else:
                item.append(sorted((a, os.getxattr(path, a).hex()) for a in os.listxattr(path)))
            entries[os.fsencode(os.path.relpath(path, top)).hex()] = item
    out[top] = entries
print(json.dumps(out))
"""


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _layer(store: FileStore, name: str, chunks: list[bytes]) -> pb.LayerIndex:
    index = pb.LayerIndex(layer_digest="sha256:" + hashlib.sha256(name.encode()).hexdigest(), format_major=FORMAT_MAJOR)
    for data in chunks:
        stored = zstandard.ZstdCompressor().compress(data)
        store.put(chunk_key(_digest(data)), stored)
        index.chunks.add(sha256=_digest(data), size=len(data), stored_size=len(stored))
    return index


def _file(index: pb.LayerIndex, path: bytes, extents: list[tuple[int, int, int]], **fields) -> pb.Entry:
    entry = index.entries.add(path=path, type=pb.ENTRY_TYPE_REGULAR, mode=fields.pop("mode", 0o644), **fields)
    for chunk, offset, length in extents:
        entry.extents.add(chunk=chunk, offset=offset, length=length)
    entry.size = sum(length for _, _, length in extents)
    return entry


def rich_view(store: FileStore, layers_below: bool = True) -> View:
    """Two layers with every kind of entry: files of one and two chunks, empty files, hardlinks,
    short and long symlinks, devices, a fifo, xattrs, long and non-UTF-8 names, a directory of
    hundreds of entries (several dirent blocks), whiteouts and an opaque directory (with layers
    below the run: overlay whiteouts and trusted.overlay.opaque)."""
    base = _layer(store, "base", [SMALL, BIG_A, BIG_B])
    add = base.entries.add
    add(path=b"", type=pb.ENTRY_TYPE_DIRECTORY, mode=0o755, mtime_ns=1_700_000_000_123_456_789)
    add(path=b"etc", type=pb.ENTRY_TYPE_DIRECTORY, mode=0o755, uid=0, gid=0, mtime_ns=1_700_000_001_000_000_000)
    _file(base, b"etc/passwd", [(0, 0, len(SMALL))], uid=1000, gid=1000, mtime_ns=1_600_000_000_500_000_000)
    _file(base, b"etc/hosts", [(0, 3, 20)], xattrs={"user.comment": b"hosts"})
    add(path=b"etc/passwd-", type=pb.ENTRY_TYPE_HARDLINK, link_target=b"etc/passwd", mode=0o644, uid=1000, gid=1000)
    _file(base, b"usr/lib/libbig.so", [(1, 0, len(BIG_A)), (2, 0, len(BIG_B))], mode=0o755)
    _file(base, b"usr/lib/ping", [(0, 0, 7)], mode=0o4755, xattrs={"security.capability": b"\x01\x00\x00\x02" + bytes(16)})
    _file(base, b"empty", [])
    add(path=b"lib", type=pb.ENTRY_TYPE_SYMLINK, link_target=b"usr/lib")
    add(path=b"long-link", type=pb.ENTRY_TYPE_SYMLINK, link_target=b"d/" * 1800)
    add(path=b"dev/null", type=pb.ENTRY_TYPE_CHAR_DEVICE, mode=0o666, dev_major=1, dev_minor=3)
    add(path=b"dev/sda", type=pb.ENTRY_TYPE_BLOCK_DEVICE, mode=0o660, dev_major=8, dev_minor=300)
    add(path=b"run/fifo", type=pb.ENTRY_TYPE_FIFO, mode=0o600)
    add(path=b"many", type=pb.ENTRY_TYPE_DIRECTORY, mode=0o700, uid=7, gid=8)
    for n in range(600):
        _file(base, b"many/" + (b"%04d-" % n) + b"x" * 120, [(0, n % 50, n % 40)])
    _file(base, b"n" * 255, [(0, 0, 1)])
    _file(base, b"caf\xe9", [(0, 1, 2)])
    top = _layer(store, "top", [SMALL[::-1]])
    top.entries.add(path=b"etc/hosts", type=pb.ENTRY_TYPE_WHITEOUT)
    top.entries.add(path=b"gone", type=pb.ENTRY_TYPE_WHITEOUT)  # of something below the run
    top.entries.add(path=b"many", type=pb.ENTRY_TYPE_OPAQUE)
    _file(top, b"many/only", [(0, 0, 10)])
    _file(top, b"etc/passwd", [(0, 0, len(SMALL))], mtime_ns=1_800_000_000_000_000_001)
    return View([base, top], layers_below=layers_below)


def read_trees(*tops: Path) -> dict:
    try:
        done = subprocess.run([sys.executable, "-c", TREE, *map(str, tops)], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {tops} hung")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


class Served:
    """A view served both ways: its FUSE tree at fuse/, its EROFS image over its FUSE blob at erofs/."""

    def __init__(self, tmp_path: Path, view: View, store: FileStore) -> None:
        self.tmp = tmp_path
        cache = ChunkCache(tmp_path / "cache", 64 << 20)
        self.pool = ThreadPoolExecutor(4)
        fetcher = ChunkFetcher([store], cache, retry_seconds=2)
        self.layout = BlobLayout(view)
        self.dirs = {name: tmp_path / name for name in ("fuse", "blob", "erofs")}
        for path in self.dirs.values():
            path.mkdir()
        self.fuse = FuseSession(view, fetcher, "fuse", self.pool)
        self.fuse.mount(self.dirs["fuse"])
        self.blob = FuseSession(BlobView(view, self.layout), fetcher, "blob", self.pool)
        self.blob.mount(self.dirs["blob"])
        write_image(view, self.layout, tmp_path / "view.img")
        assert oct(os.stat(tmp_path / "view.img").st_mode & 0o777) == "0o600"
        mount_erofs(tmp_path / "view.img", self.dirs["blob"] / "blob", self.dirs["erofs"])

    def close(self) -> None:
        for name in ("erofs", "blob", "fuse"):
            lazy_unmount(self.dirs[name])
        self.pool.shutdown(cancel_futures=True)


@needs_erofs
def test_erofs_view_equals_the_fuse_view(tmp_path):
    store = FileStore(tmp_path / "store")
    served = Served(tmp_path, rich_view(store), store)
    try:
        trees = read_trees(served.dirs["fuse"], served.dirs["erofs"])
        fuse, erofs = trees[str(served.dirs["fuse"])], trees[str(served.dirs["erofs"])]
        assert sorted(set(fuse) ^ set(erofs)) == []
        assert {p: (fuse[p], erofs[p]) for p in fuse if fuse[p] != erofs[p]} == {}
        names = {bytes.fromhex(p) for p in erofs}
        assert {b"gone", b"many/only", b"caf\xe9", b"n" * 255, b"long-link"} <= names
        assert b"many/0000-" + b"x" * 120 not in names  # hidden by the opaque directory above it
        for whiteout in (b"gone", b"etc/hosts"):  # overlay whiteouts: what lies below the run stays hidden
            mode, rdev = erofs[whiteout.hex()][0], erofs[whiteout.hex()][5]
            assert stat.S_ISCHR(mode) and rdev == 0
        assert ["trusted.overlay.opaque", b"y".hex()] in erofs[b"many".hex()][-1]
        # the kernel answered every lookup, stat and listing: the blob's server saw its one file looked up
        assert served.blob.requests.get(1, 0) <= 1 and 44 not in served.blob.requests, served.blob.requests
    finally:
        served.close()


@needs_erofs
def test_a_directory_of_many_entries_is_searched_and_listed_by_the_kernel(tmp_path):
    """Names are found in every one of a large directory's dirent blocks (the kernel searches them)."""
    store = FileStore(tmp_path / "store")
    base = View([rich_view(store).layers[0]])
    served = Served(tmp_path, base, store)
    try:
        many = served.dirs["erofs"] / "many"
        listing = subprocess.run(["ls", "-f", str(many)], capture_output=True, text=True, timeout=30).stdout.split()
        assert len(listing) == 602  # 600, "." and ".."
        for n in (0, 1, 299, 599):
            name = f"{n:04d}-" + "x" * 120
            done = subprocess.run(["stat", "-c", "%s", str(many / name)], capture_output=True, text=True, timeout=30)
            assert done.stdout.strip() == str(n % 40), done.stderr
        missing = subprocess.run(["stat", str(many / ("9999-" + "x" * 120))], capture_output=True, timeout=30)
        assert missing.returncode != 0
    finally:
        served.close()


def test_blob_layout_maps_every_byte(tmp_path):
    """Each file starts on a block; a read anywhere in the blob is the files' bytes and zeros between."""
    view = rich_view(FileStore(tmp_path / "store"), layers_below=False)
    layout = BlobLayout(view)
    assert layout.size % BLOCK == 0 and all(start % BLOCK == 0 for start in layout.starts)
    blob = BlobView(view, layout)
    position = 0
    for at, node, start, length in layout.files_in(0, layout.size):
        assert at == position and length > 0
        if node is not None:
            assert stat.S_ISREG(node.mode) and start + length <= node.size
        position += length
    assert position == layout.size
    library = view.resolve(b"usr/lib/libbig.so")
    end = layout.block_of(library) * BLOCK + len(BIG_A) + len(BIG_B)
    assert end % BLOCK  # the library ends inside a block: padding follows
    pieces = blob.extents_for(blob.blob, end - 10, 20)
    assert [(c.sha256 if c else None, at, n) for c, at, n in pieces] == [(_digest(BIG_B), len(BIG_B) - 10, 10), (None, 0, 10)]
    assert blob.extents_for(blob.blob, layout.size, 100) == []


def test_what_erofs_cannot_hold_is_refused(tmp_path):
    store = FileStore(tmp_path / "store")
    index = _layer(store, "x", [SMALL])
    index.entries.add(path=b"", type=pb.ENTRY_TYPE_DIRECTORY, mode=0o755)
    _file(index, b"odd", [(0, 0, 1)], xattrs={"system.something": b"1"})
    view = View([index])
    with pytest.raises(ErofsUnsupported, match="namespace EROFS cannot store"):
        build_image(view, BlobLayout(view))
    index.entries[-1].ClearField("xattrs")
    index.entries.add(path=b"far", type=pb.ENTRY_TYPE_SYMLINK, link_target=b"x" * (BLOCK + 1))
    view = View([index])
    with pytest.raises(ErofsUnsupported, match="too long"):
        build_image(view, BlobLayout(view))
    # values a foreign index may carry that EROFS's fields cannot: a clear error, never struct's
    del index.entries[-1]  # the long symlink
    view = View([index])
    view.resolve(b"odd").size = 1 << 45
    with pytest.raises(ErofsUnsupported, match="16 TiB"):
        build_image(view, BlobLayout(view))
    view.resolve(b"odd").size = 1
    view.resolve(b"odd").uid = 1 << 40
    with pytest.raises(ErofsUnsupported, match="does not fit"):
        build_image(view, BlobLayout(view))


@dataclass
class Daemonless:
    """What a daemon's Views need, over the rich view's layers: local indexes, a fetcher, a pool."""

    root: Path
    indexes: IndexDir
    fetcher: ChunkFetcher
    pool: ThreadPoolExecutor
    spec: ViewSpec

    def views(self, erofs: bool = True) -> Views:
        return Views(self.root, self.indexes, self.fetcher, self.pool, erofs=erofs)


@pytest.fixture
def parts(tmp_path):
    store = FileStore(tmp_path / "store")
    view = rich_view(store, layers_below=False)
    indexes = IndexDir(tmp_path / "root" / "indexes", [store])
    for index in view.layers:
        indexes.put(index.layer_digest, zstandard.ZstdCompressor().compress(index.SerializeToString()))
    pool = ThreadPoolExecutor(4)
    fetcher = ChunkFetcher([store], ChunkCache(tmp_path / "cache", 64 << 20), retry_seconds=2)
    layers = [index.layer_digest for index in view.layers]
    yield Daemonless(tmp_path / "root", indexes, fetcher, pool, ViewSpec(view_id(layers, False), layers, False))
    pool.shutdown(cancel_futures=True)


def test_a_daemon_whose_kernel_cannot_mount_erofs_serves_fuse_views(tmp_path, parts, monkeypatch, caplog):
    """The kernel's refusal (a kernel before 6.12 answers ENOTBLK) is the one fault made up here, at the
    mount call: the view is served by FUSE, and so is every later one, with one line saying why."""

    def refuse(image, blob, mountpoint, flags=0):
        raise OSError(errno.ENOTBLK, f"mount erofs {image} at {mountpoint}: Block device required")

    monkeypatch.setattr(views_module, "mount_erofs", refuse)
    views, spec = parts.views(), parts.spec
    caplog.set_level(logging.INFO)
    try:
        mounted, fresh = views.mount(spec)
        assert fresh and not mounted.erofs and not views.erofs
        assert str(mounted.mountpoint) in views_module._fuse_mounts()
        assert "this and later views are served by FUSE" in caplog.text
        assert not (tmp_path / "root" / "mnt" / f"{spec.view_id}.blob").exists()
        assert list((tmp_path / "root" / "erofs").iterdir()) == []
        passwd = read_trees(mounted.mountpoint)[str(mounted.mountpoint)][b"etc/passwd".hex()]
        assert passwd[-2] == hashlib.sha256(SMALL[::-1]).hexdigest()  # the top layer's
    finally:
        views.unmount(spec.view_id)


@needs_erofs
def test_views_mount_erofs_and_unmount_both_mounts(tmp_path, parts):
    views, spec = parts.views(), parts.spec
    mounted, _ = views.mount(spec)
    try:
        assert mounted.erofs and str(mounted.mountpoint) in views_module._mounts(b"erofs")
        record = next(r for r in views.recorded() if not isinstance(r, tuple))
        assert record.erofs and record.inodes
        reads: list[tuple[bytes, int, int]] = []
        mounted.record_reads(lambda node, offset, length: reads.append((node.origin, offset, length)))
        tree = read_trees(mounted.mountpoint)[str(mounted.mountpoint)]
        assert tree[b"usr/lib/libbig.so".hex()][-2] == hashlib.sha256(BIG_A + BIG_B).hexdigest()
        mounted.record_reads(None)
        # a recording sees the blob's reads as the files they cover, whole and nothing past their ends
        library = [(offset, length) for origin, offset, length in reads if origin == b"usr/lib/libbig.so"]
        assert sum(length for _, length in library) == len(BIG_A) + len(BIG_B), library
        assert all(origin for origin, _, _ in reads)
        image = tmp_path / "root" / "erofs" / f"{spec.view_id}.img"
        assert image.exists() and image.stat().st_mode & 0o777 == 0o600
    finally:
        views.unmount(spec.view_id)
    assert str(mounted.mountpoint) not in views_module._mounts(b"erofs")
    assert str(mounted.mountpoint) + ".blob" not in views_module._fuse_mounts()
    assert not (tmp_path / "root" / "erofs" / f"{spec.view_id}.img").exists()


@needs_erofs
def test_a_new_daemon_serves_the_blob_again_and_remounts_a_lost_image(tmp_path, parts):
    """A handover in-process: the first Views stops serving and passes the blob's descriptor; the second
    re-attaches it (same layout, checked by the inode digest) and mounts the EROFS image again where it is
    gone (here: unmounted by hand; a new daemon finds the blob's connection but no image mount)."""
    first, spec = parts.views(), parts.spec
    mounted, _ = first.mount(spec)
    second = None
    try:
        fds, unanswered = first.stop_all(5.0)
        assert unanswered == 0 and list(fds) == [spec.view_id]
        lazy_unmount(mounted.mountpoint)  # the image's mount is lost; the blob's connection lives on
        assert str(mounted.mountpoint) not in views_module._mounts(b"erofs")
        second = parts.views(erofs=False)  # its own option does not matter
        record = next(r for r in second.recorded() if not isinstance(r, tuple))
        again = second.attach(record, fds[spec.view_id])
        assert again is not None and again.erofs
        assert str(mounted.mountpoint) in views_module._mounts(b"erofs")
        tree = read_trees(again.mountpoint)[str(again.mountpoint)]
        assert tree[b"usr/lib/libbig.so".hex()][-2] == hashlib.sha256(BIG_A + BIG_B).hexdigest()
    finally:
        (second or first).unmount(spec.view_id)


@needs_erofs
def test_a_view_erofs_cannot_hold_is_served_by_fuse_alone(tmp_path, caplog):
    """An xattr namespace EROFS has no index for: that view is a FUSE view, the next one EROFS again."""
    store = FileStore(tmp_path / "store")
    odd = _layer(store, "odd", [SMALL])
    odd.entries.add(path=b"", type=pb.ENTRY_TYPE_DIRECTORY, mode=0o755)
    _file(odd, b"odd", [(0, 0, 5)], xattrs={"system.something": b"1"})
    plain = _layer(store, "plain", [SMALL])
    plain.entries.add(path=b"", type=pb.ENTRY_TYPE_DIRECTORY, mode=0o755)
    _file(plain, b"plain", [(0, 0, 5)])
    indexes = IndexDir(tmp_path / "root" / "indexes", [store])
    for index in (odd, plain):
        indexes.put(index.layer_digest, zstandard.ZstdCompressor().compress(index.SerializeToString()))
    pool = ThreadPoolExecutor(4)
    fetcher = ChunkFetcher([store], ChunkCache(tmp_path / "cache", 64 << 20), retry_seconds=2)
    views = Views(tmp_path / "root", indexes, fetcher, pool, erofs=True)
    specs = [ViewSpec(view_id([i.layer_digest], False), [i.layer_digest], False) for i in (odd, plain)]
    try:
        first, _ = views.mount(specs[0])
        assert not first.erofs and views.erofs
        assert "namespace EROFS cannot store" in caplog.text
        second, _ = views.mount(specs[1])
        assert second.erofs
    finally:
        for spec in specs:
            views.unmount(spec.view_id)
        pool.shutdown(cancel_futures=True)
