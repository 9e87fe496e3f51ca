"""A FUSE request whose handler fails is answered EIO: left unanswered, the reading process would
sleep uninterruptibly for good. An in-process FuseSession over a tiny real view, with real faults
in the chunk cache; the reader runs in a subprocess with a timeout, so a regression cannot hang
the suite."""

from __future__ import annotations

import errno
import hashlib
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
from snapshotter.fuse_server import FuseSession, lazy_unmount
from snapshotter.fuse_tree import View

DATA = b"the bytes of a file in a lazy view\n" * 100
READER = """
import sys
try:
    open(sys.argv[1], "rb").read()
except OSError as e:
    print(e.errno)
else:
    print("read")
"""


def _view(store: FileStore) -> View:
    sha256 = hashlib.sha256(DATA).digest()
    stored = zstandard.ZstdCompressor().compress(DATA)
    store.put(chunk_key(sha256), stored)
    index = index_pb2.LayerIndex(layer_digest="sha256:" + "ab" * 32)
    index.chunks.add(sha256=sha256, size=len(DATA), stored_size=len(stored))
    index.entries.add(path=b"", type=index_pb2.ENTRY_TYPE_DIRECTORY, mode=0o755)
    entry = index.entries.add(path=b"file", type=index_pb2.ENTRY_TYPE_REGULAR, mode=0o644, size=len(DATA))
    entry.extents.add(chunk=0, offset=0, length=len(DATA))
    bad = index.entries.add(path=b"bad", type=index_pb2.ENTRY_TYPE_REGULAR, mode=0o644, size=len(DATA))
    bad.extents.add(chunk=0, offset=1, length=len(DATA))  # one byte past its chunk: a corrupt index
    return View([index])


def _read_in_subprocess(path: Path) -> str:
    """What a reader of `path` gets: 'read' or the errno; fails the test if the read hangs."""
    try:
        done = subprocess.run([sys.executable, "-c", READER, str(path)], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {path} hung: the FUSE request was never answered")
    return done.stdout.strip()


@pytest.fixture
def session(tmp_path):
    """A mounted FuseSession over a one-file view, its cache and mount point; unmounted afterwards."""
    store = FileStore(tmp_path / "store")
    view = _view(store)
    cache = ChunkCache(tmp_path / "cache", 1 << 20)
    pool = ThreadPoolExecutor(2)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    made: list[FuseSession] = []

    def mount() -> tuple[FuseSession, ChunkCache]:
        fetcher = ChunkFetcher([store], cache, retry_seconds=1)
        fuse = FuseSession(view, fetcher, "errors", pool)
        fuse.mount(mountpoint)
        made.append(fuse)
        return fuse, cache

    yield mount, mountpoint, cache
    for fuse in made:
        lazy_unmount(mountpoint)
        os.close(fuse.fd)
    pool.shutdown(cancel_futures=True)


def test_a_read_whose_cache_write_fails_on_the_fetch_pool_gets_eio(session, caplog):
    """The chunk is not cached, so the read goes to the fetch pool; storing the fetched chunk fails
    (its cache directory is a file): not ChunkUnavailable, so before the fix nobody answered."""
    mount, mountpoint, cache = session
    sha256 = hashlib.sha256(DATA).digest()
    cache.path(sha256).parent.write_bytes(b"not a directory")
    mount()
    assert _read_in_subprocess(mountpoint / "file") == str(errno.EIO)
    failures = [r for r in caplog.records if "request failed" in r.getMessage()]
    assert failures, "the failure is logged"  # once per request (the kernel may retry a failed readahead)
    assert all(r.getMessage() == "view errors: read request failed; answered EIO" and r.exc_info for r in failures)


def test_a_read_whose_cached_chunk_cannot_be_read_gets_eio(session):
    """The chunk is cached, so the read is answered on the reader thread; its cache file was replaced
    by a directory after the cache found it (reading it raises EISDIR). The view keeps serving."""
    mount, mountpoint, _ = session
    sha256 = hashlib.sha256(DATA).digest()
    ChunkCache(mountpoint.parent / "cache", 1 << 20).put(sha256, DATA)
    fuse, cache = mount()
    cache.__init__(mountpoint.parent / "cache", 1 << 20)  # found at start: hashed before its first use
    path = cache.path(sha256)
    path.unlink()
    path.mkdir()
    assert _read_in_subprocess(mountpoint / "file") == str(errno.EIO)
    assert sorted(os.listdir(mountpoint)) == ["bad", "file"]  # the reader threads still serve
    assert fuse.alive()


def test_a_file_whose_extent_lies_outside_its_chunk_reads_eio_with_the_reason(session, caplog):
    """The daemon loads indexes without checking every extent (a start reads few files): a file's
    extents are checked on its first read. The corrupt one is refused in one line; the others read."""
    mount, mountpoint, _ = session
    fuse, _ = mount()
    assert _read_in_subprocess(mountpoint / "bad") == str(errno.EIO)
    assert _read_in_subprocess(mountpoint / "file") == "read"
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refused and all(
        m.startswith("view errors: read of inode ") and f"layer sha256:{'ab' * 32} is corrupt: file b'bad' points outside" in m
        for m in refused
    ), refused
    assert not [r for r in caplog.records if r.exc_info]  # a reason, not a traceback
    assert fuse.alive()
