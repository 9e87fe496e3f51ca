"""FUSE passthrough (Linux 6.9+): a file whose bytes are all local is read by the kernel from a
backing file, with no READ reaching the daemon; a file with bytes still remote, a connection
without passthrough (--no-passthrough, or a kernel before 6.9) and a view being recorded are
served through the daemon as before. A restarted daemon re-uses the backing ids and the open
modes the dead one left, so opens of files held open across the restart keep working.

In-process FuseSessions over a small real view (chunks in a file store); readers run in a
subprocess with a timeout, so a regression cannot hang the suite."""

from __future__ import annotations

import hashlib
import mmap
import os
import stat
import subprocess
import sys
import time
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
from snapshotter.fuse_passthrough import BackingFiles, boot_id
from snapshotter.fuse_server import FuseSession, lazy_unmount
from snapshotter.fuse_tree import View

CHUNK_A = bytes(range(256)) * 1024  # 256 KiB
CHUNK_B = b"the second chunk of a two-chunk file\n" * 5000
SMALL = b"a small file, all in one chunk\n" * 40
READER = """
import hashlib, sys
try:
    data = open(sys.argv[1], "rb").read()
except OSError as e:
    print("errno", e.errno)
else:
    print(hashlib.sha256(data).hexdigest())
"""


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _view(store: FileStore) -> View:
    """`whole` (one chunk), `split` (two chunks), `small` (its own chunk) and an empty file."""
    index = index_pb2.LayerIndex(layer_digest="sha256:" + "cd" * 32)
    for data in (CHUNK_A, CHUNK_B, SMALL):
        stored = zstandard.ZstdCompressor().compress(data)
        store.put(chunk_key(_digest(data)), stored)
        index.chunks.add(sha256=_digest(data), size=len(data), stored_size=len(stored))
    index.entries.add(path=b"", type=index_pb2.ENTRY_TYPE_DIRECTORY, mode=0o755)
    whole = index.entries.add(path=b"whole", type=index_pb2.ENTRY_TYPE_REGULAR, mode=0o644, size=len(CHUNK_A))
    whole.extents.add(chunk=0, offset=0, length=len(CHUNK_A))
    split = index.entries.add(path=b"split", type=index_pb2.ENTRY_TYPE_REGULAR, mode=0o644, size=len(CHUNK_A) + len(CHUNK_B))
    split.extents.add(chunk=0, offset=0, length=len(CHUNK_A))
    split.extents.add(chunk=1, offset=0, length=len(CHUNK_B))
    small = index.entries.add(path=b"small", type=index_pb2.ENTRY_TYPE_REGULAR, mode=0o644, size=len(SMALL))
    small.extents.add(chunk=2, offset=0, length=len(SMALL))
    index.entries.add(path=b"empty", type=index_pb2.ENTRY_TYPE_REGULAR, mode=0o644, size=0)
    return View([index])


def read_in_subprocess(path: Path) -> str:
    """The sha256 of what a reader of `path` gets, or 'errno N'; fails the test if the read hangs."""
    try:
        done = subprocess.run([sys.executable, "-c", READER, str(path)], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {path} hung")
    return done.stdout.strip()


def _kernel_has_passthrough() -> bool:
    release = tuple(int(x) for x in os.uname().release.split(".")[:2] if x.isdigit())
    return release >= (6, 9)


needs_passthrough = pytest.mark.skipif(not _kernel_has_passthrough(), reason="FUSE passthrough needs Linux 6.9+")


class Node:
    """A test's FUSE node: store, cache, one view, and sessions mounted or attached on it."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.store = FileStore(tmp_path / "store")
        self.view = _view(self.store)
        self.cache = ChunkCache(tmp_path / "cache", 64 << 20)
        self.backing = BackingFiles(tmp_path / "files", self.cache)
        self.pool = ThreadPoolExecutor(4)
        self.mountpoint = tmp_path / "mnt"
        self.mountpoint.mkdir()
        self.states = tmp_path / "view.inodes"
        self.sessions: list[FuseSession] = []

    def session(self, passthrough: bool = True) -> FuseSession:
        fetcher = ChunkFetcher([self.store], self.cache, retry_seconds=2)
        session = FuseSession(
            self.view,
            fetcher,
            "passthrough",
            self.pool,
            backing=self.backing if passthrough else None,
            states_path=self.states if passthrough else None,
        )
        self.sessions.append(session)
        return session

    def mount(self, passthrough: bool = True) -> FuseSession:
        session = self.session(passthrough)
        session.mount(self.mountpoint)
        return session

    def cache_chunks(self, *datas: bytes) -> None:
        for data in datas:
            self.cache.put(_digest(data), data)

    def close(self) -> None:
        lazy_unmount(self.mountpoint)
        for session in self.sessions:
            session._stopping = True
        if self.sessions:
            os.close(self.sessions[0].fd)
        self.pool.shutdown(cancel_futures=True)


@pytest.fixture
def node(tmp_path):
    n = Node(tmp_path)
    yield n
    n.close()


@needs_passthrough
def test_a_fully_local_file_is_read_by_the_kernel_not_the_daemon(node):
    node.cache_chunks(CHUNK_A)
    session = node.mount()
    assert session.passthrough and not session.flags & k.NO_OPEN_SUPPORT
    assert read_in_subprocess(node.mountpoint / "whole") == hashlib.sha256(CHUNK_A).hexdigest()
    with open(node.mountpoint / "whole", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert m[:] == CHUNK_A  # mmap goes to the backing file too
    assert session.requests.get(k.READ, 0) == 0, session.requests
    assert session.opens["passthrough"] == 2 and session.requests[k.OPEN] == 2
    backing = node.backing.path(node.view, node.view.resolve(b"whole"))
    assert backing.read_bytes() == CHUNK_A
    assert stat.S_IMODE(backing.stat().st_mode) == 0o600 and backing.parent.parent.name == boot_id()


@needs_passthrough
def test_a_partly_local_file_is_read_through_the_daemon(node):
    node.cache_chunks(CHUNK_A)  # CHUNK_B is only in the store
    session = node.mount()
    assert read_in_subprocess(node.mountpoint / "split") == hashlib.sha256(CHUNK_A + CHUNK_B).hexdigest()
    assert session.requests.get(k.READ, 0) > 0
    assert session.opens == {"passthrough": 0, "cached": 1}
    assert not node.backing.path(node.view, node.view.resolve(b"split")).exists()
    # all of it is local now; once the cached-mode open is released (RELEASE is sent in the
    # background after close) the next open is passthrough
    ino = node.view.resolve(b"split").ino
    deadline = time.monotonic() + 10
    while session.states.cached_opens(ino) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert session.states.cached_opens(ino) == 0, "the kernel never released the first open"
    assert read_in_subprocess(node.mountpoint / "split") == hashlib.sha256(CHUNK_A + CHUNK_B).hexdigest()
    assert session.opens == {"passthrough": 1, "cached": 1}


@needs_passthrough
def test_an_open_in_cached_mode_keeps_the_file_out_of_passthrough(node):
    """The kernel refuses (EIO to the reader) a passthrough open of an inode open in cached mode."""
    session = node.mount()
    with open(node.mountpoint / "small", "rb") as held:  # not local: cached mode, fetched on read
        assert held.read() == SMALL
        assert read_in_subprocess(node.mountpoint / "small") == hashlib.sha256(SMALL).hexdigest()
        assert session.opens == {"passthrough": 0, "cached": 2}


def test_without_passthrough_the_daemon_asks_for_no_open_and_serves_reads(node):
    node.cache_chunks(CHUNK_A)
    session = node.mount(passthrough=False)
    assert not session.passthrough and session.flags & k.NO_OPEN_SUPPORT
    assert read_in_subprocess(node.mountpoint / "whole") == hashlib.sha256(CHUNK_A).hexdigest()
    assert read_in_subprocess(node.mountpoint / "empty") == hashlib.sha256(b"").hexdigest()
    assert session.requests.get(k.READ, 0) > 0
    assert session.requests.get(k.OPEN, 0) <= 1  # the first is answered ENOSYS: no-open from then on
    assert not list(node.backing.dir.iterdir())


@needs_passthrough
def test_recording_turns_passthrough_off_for_new_opens(node):
    node.cache_chunks(CHUNK_A, SMALL)
    session = node.mount()
    seen: list[tuple[bytes, int, int]] = []
    session.on_read = lambda n, offset, size: seen.append((n.origin, offset, size))
    assert read_in_subprocess(node.mountpoint / "whole") == hashlib.sha256(CHUNK_A).hexdigest()
    assert session.opens["passthrough"] == 0 and session.requests[k.READ] > 0
    assert {origin for origin, _, _ in seen} == {b"whole"}


@needs_passthrough
def test_a_restarted_daemon_reuses_the_backing_ids_and_open_modes(node):
    """Files held open across a restart: a passthrough one (a new open needs the same backing id, or
    the kernel answers EIO) and a cached-mode one whose bytes became local meanwhile (a passthrough
    open of it would fail the same way)."""
    node.cache_chunks(CHUNK_A)
    old = node.mount()
    with open(node.mountpoint / "whole", "rb") as passthrough_held, open(node.mountpoint / "small", "rb") as cached_held:
        assert old.opens == {"passthrough": 1, "cached": 1}
        assert old.stop_serving(5) == 0  # the daemon goes; the connection stays
        node.cache_chunks(SMALL)
        new = node.session()
        new.attach(old.fd, node.mountpoint, old.init_state())
        assert new.passthrough and new.states is not None
        assert read_in_subprocess(node.mountpoint / "whole") == hashlib.sha256(CHUNK_A).hexdigest()
        assert read_in_subprocess(node.mountpoint / "small") == hashlib.sha256(SMALL).hexdigest()
        assert new.opens == {"passthrough": 1, "cached": 1}
        assert passthrough_held.read() == CHUNK_A and cached_held.read() == SMALL
    assert new.requests.get(k.READ, 0) >= 1  # only the cached-mode file's
