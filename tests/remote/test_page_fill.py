"""The page fill: a start's local bytes put in the kernel's page cache (FUSE_NOTIFY_STORE) before the
start reads them. A real FUSE session over a small real view, its chunks in a file store; every
check reads the files back through the kernel and counts the READs the daemon was asked."""

from __future__ import annotations

import hashlib
import os
import random
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
from snapshotter.fuse_kernel import READ
from snapshotter.fuse_server import FuseSession, lazy_unmount
from snapshotter.fuse_tree import View
from snapshotter.page_fill import PageFill, local_runs

LAYER = "sha256:" + "cd" * 32
# two files of 3 chunks each, the chunks' sizes not multiples of a page
SIZES = [5_001, 70_003, 30_000]


class Node:
    """A mounted one-layer view, its store, cache and fetcher."""

    def __init__(self, root: Path) -> None:
        rng = random.Random(7)
        self.store = FileStore(root / "store")
        index = index_pb2.LayerIndex(layer_digest=LAYER)
        index.entries.add(path=b"", type=index_pb2.ENTRY_TYPE_DIRECTORY, mode=0o755)
        index.entries.add(path=b"dir", type=index_pb2.ENTRY_TYPE_DIRECTORY, mode=0o755)
        self.data: dict[str, bytes] = {}
        for name in ("dir/first", "second"):
            pieces = [rng.randbytes(size) for size in SIZES]
            entry = index.entries.add(path=name.encode(), type=index_pb2.ENTRY_TYPE_REGULAR, mode=0o644, size=sum(SIZES))
            for piece in pieces:
                sha256 = hashlib.sha256(piece).digest()
                stored = zstandard.ZstdCompressor().compress(piece)
                self.store.put(chunk_key(sha256), stored)
                entry.extents.add(chunk=len(index.chunks), offset=0, length=len(piece))
                index.chunks.add(sha256=sha256, size=len(piece), stored_size=len(stored))
            self.data[name] = b"".join(pieces)
        self.index = index
        self.view = View([index])
        self.cache = ChunkCache(root / "cache", 1 << 24)
        self.fetcher = ChunkFetcher([self.store], self.cache, retry_seconds=1)
        self.pool = ThreadPoolExecutor(2)
        self.mountpoint = root / "mnt"
        self.mountpoint.mkdir()
        self.session = FuseSession(self.view, self.fetcher, "fill", self.pool)
        self.session.mount(self.mountpoint)

    def chunks(self, name: str) -> list[bytes]:
        node = self.view.resolve(name.encode())
        return [chunk.sha256 for chunk, _, _ in self.view.spans(node)]

    def fetch(self, sha256s: list[bytes]) -> None:
        sizes = {chunk.sha256: chunk.size for chunk in self.index.chunks}
        for sha256 in sha256s:
            self.fetcher.read(sha256, sizes[sha256], 0, 1, LAYER)

    def fill(self, files: list[str], profile: list[bytes]) -> PageFill:
        fill = PageFill(self.session.fd, self.view, self.mountpoint, files, profile, self.cache, self.session.read_inos)
        return fill.start()

    def reads(self) -> int:
        return self.session.requests.get(READ, 0)

    def close(self) -> None:
        lazy_unmount(self.mountpoint)
        os.close(self.session.fd)
        self.pool.shutdown(cancel_futures=True)


@pytest.fixture
def node(tmp_path):
    made = Node(tmp_path)
    yield made
    made.close()


def test_filled_files_are_read_without_asking_the_daemon(node):
    profile = node.chunks("dir/first") + node.chunks("second")
    fill = node.fill(["/dir/first", "/no/such/file", "/dir", "/second"], profile)
    node.fetch(profile)  # the prefetch brings the chunks after the fill started: it waits for them
    fill.thread.join(10)
    assert not fill.thread.is_alive()
    assert (fill.pushed_files, fill.pushed_bytes) == (2, 2 * sum(SIZES))
    for name, data in node.data.items():
        assert (node.mountpoint / name).read_bytes() == data
    assert node.reads() == 0


def test_only_local_whole_pages_are_given_and_the_rest_is_read(node):
    first, _middle, last = node.chunks("second")
    node.fetch([first, last])  # the middle chunk is not in the profile, not cached
    fill = node.fill(["/second"], [first, last])
    fill.thread.join(10)
    # chunk 1 ends at 5,001: its partial last page is not given; chunk 3 starts at 75,004 (its first
    # whole page at 77,824) and runs to the end of the file
    assert fill.pushed_bytes == 4096 + (sum(SIZES) - 77_824)
    assert (node.mountpoint / "second").read_bytes() == node.data["second"]
    assert node.reads() >= 1  # the middle, and the pages next to it


def test_local_runs_cut_partial_pages_except_at_the_end_of_the_file(node):
    first, _, last = node.chunks("dir/first")
    node.fetch([first, last])
    runs, covered = local_runs(node.view, node.view.resolve(b"dir/first"), node.cache)
    assert covered == {0, 2}
    assert [(begin, end) for begin, end, _ in runs] == [(0, 4096), (77_824, sum(SIZES))]
    assert [sum(size for _, _, size in pieces) for _, _, pieces in runs] == [4096, sum(SIZES) - 77_824]
    assert runs[1][2][0][1] == 77_824 - (SIZES[0] + SIZES[1])  # the last chunk read from its offset 2,820


def test_a_file_whose_chunks_come_apart_is_filled_as_they_come(node):
    """A large file read here and there: its first profile chunk comes early, its last one late. The
    fill gives what has come and goes on with the next files, and comes back for the rest."""
    a1, a2, a3 = node.chunks("dir/first")
    b1, b2, b3 = node.chunks("second")
    profile = [a1, b1, b2, b3, a2, a3]  # the second file's chunks between the first file's
    node.fetch([a1, b1, b2, b3])
    fill = node.fill(["/dir/first", "/second"], profile)
    deadline = time.monotonic() + 10
    while fill.pushed_files < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fill.pushed_files == 2 and fill.thread.is_alive()  # waiting for the rest of the first file
    node.fetch([a2, a3])
    fill.thread.join(10)
    assert not fill.thread.is_alive()
    # the page across the first chunk's end went with the second push, taken from the cached first chunk
    assert fill.pushed_bytes == 2 * sum(SIZES)
    for name, data in node.data.items():
        assert (node.mountpoint / name).read_bytes() == data
    assert node.reads() == 0


def test_a_small_file_the_start_read_first_is_left_alone(node):
    profile = node.chunks("dir/first")
    node.fetch(profile)
    assert (node.mountpoint / "dir/first").read_bytes() == node.data["dir/first"]
    fill = node.fill(["/dir/first"], profile)
    fill.thread.join(10)
    assert fill.pushed_files == 0


def test_dropping_the_fill_takes_its_pages_back(node):
    """A recording starting on a filled view must see every read: the pages given are dropped."""
    profile = node.chunks("dir/first")
    node.fetch(profile)
    fill = node.fill(["/dir/first"], profile)
    fill.thread.join(10)
    assert fill.pushed_files == 1
    fill.drop()
    assert (node.mountpoint / "dir/first").read_bytes() == node.data["dir/first"]
    assert node.reads() >= 1


def test_a_file_the_kernel_holds_already_is_filled_without_a_lookup(node):
    """Listing a directory (READDIRPLUS) makes the kernel hold its entries' inodes: the fill asks the
    kernel first (an empty store) and looks up only the files it does not hold."""
    profile = node.chunks("dir/first") + node.chunks("second")
    node.fetch(profile)
    assert sorted(os.listdir(node.mountpoint / "dir")) == ["first"]
    fill = node.fill(["/dir/first", "/second"], profile)
    fill.thread.join(10)
    assert (fill.pushed_files, fill.looked_up) == (2, 1)  # /second was not listed: looked up
    assert (node.mountpoint / "dir/first").read_bytes() == node.data["dir/first"]
    assert node.reads() == 0
