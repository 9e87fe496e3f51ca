"""Put a start's local bytes in the kernel's page cache before the start reads them.

A first start reads its files through the view: each page the kernel lacks costs a FUSE READ
round trip through the daemon, one after the other on the start's critical path. The startup
profile names the files a start reads, in first-access order, and the profile's prefetch puts
their bytes in the chunk cache. `PageFill` walks those files beside the start: it looks each one
up through the view's own mount (the kernel must hold the inode to take its pages) and pushes
the file's cached bytes into the inode's page cache with FUSE_NOTIFY_STORE, so that the start's
reads are answered by the kernel. Files whose chunks are not cached yet are taken up again once
they are; files the start has already read are skipped; nothing here changes what a read returns
(the pages pushed are the file's own bytes, checked like any read's).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from layerstore.cache import ChunkCache
from layerstore.errors import FormatError
from snapshotter import fuse_kernel as k
from snapshotter.fuse_tree import Node, View

log = logging.getLogger(__name__)

PAGE = 4096
MAX_PUSH = 4 << 20  # bytes per notification
GIVE_UP_SECONDS = 30.0  # files whose chunks are not cached by then are left to the start's reads
RETRY_SECONDS = 0.01


def local_runs(view: View, node: Node, cache: ChunkCache) -> list[tuple[int, int, list[tuple[bytes, int, int]]]]:
    """The file's byte ranges whose chunks are cached, whole pages only (the kernel keeps a partial
    page only at the end of the file): (start, end, pieces (sha256, offset in chunk, length)) each."""
    runs: list[tuple[int, int, list[tuple[bytes, int, int]]]] = []
    position = 0
    current: list[tuple[bytes, int, int]] = []
    start = 0
    for chunk, at, size in view.spans(node):
        if chunk.sha256 in cache:
            if not current:
                start = position
            current.append((chunk.sha256, at, size))
        elif current:
            runs.append((start, position, current))
            current = []
        position += size
    if current:
        runs.append((start, position, current))
    out = []
    for begin, end, pieces in runs:
        first = -(-begin // PAGE) * PAGE
        last = end if end >= node.size else end // PAGE * PAGE
        if last > first:
            out.append((first, last, _trim(pieces, first - begin, last - begin)))
    return out


def _trim(pieces: list[tuple[bytes, int, int]], skip: int, stop: int) -> list[tuple[bytes, int, int]]:
    """The pieces covering bytes [skip, stop) of their concatenation."""
    out = []
    position = 0
    for sha256, at, size in pieces:
        lo, hi = max(skip, position), min(stop, position + size)
        if hi > lo:
            out.append((sha256, at + lo - position, hi - lo))
        position += size
    return out


class PageFill:
    """Fills the page cache of a FUSE view's files, in the profile's order, on a thread of its own."""

    def __init__(
        self,
        fd: int,
        view: View,
        mountpoint: Path,
        files: Sequence[str],
        hot: set[bytes],
        cache: ChunkCache,
        already_read: set[int],
    ) -> None:
        self.fd = fd
        self.view = view
        self.mountpoint = mountpoint
        self.files = list(files)
        self.hot = hot  # the profile's chunks: those the prefetch brings
        self.cache = cache
        self.already_read = already_read  # inodes the view has served a READ for (the start got there first)
        self.stop = threading.Event()
        self.pushed_files = 0
        self.pushed_bytes = 0
        self.pushed: list[int] = []  # inodes given pages
        self.thread = threading.Thread(target=self._run, name=f"page-fill-{mountpoint.name[:8]}", daemon=True)

    def start(self) -> PageFill:
        self.thread.start()
        return self

    def drop(self) -> None:
        """Stop, and take back the pages given (a recording must see every read of the start)."""
        self.stop.set()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join()
        for ino in self.pushed:
            message = k.NOTIFY_INVAL_INODE_OUT.pack(ino, 0, 0)
            try:
                os.write(self.fd, k.OUT_HEADER.pack(k.OUT_HEADER.size + len(message), k.NOTIFY_INVAL_INODE, 0) + message)
            except OSError as e:
                if e.errno != errno.ENOENT:  # ENOENT: the kernel dropped the inode, and its pages, itself
                    log.warning("view %s: cannot drop the pages given to inode %d: %s", self.mountpoint.name, ino, e)
        self.pushed.clear()

    def _run(self) -> None:
        started = time.monotonic()
        deadline = started + GIVE_UP_SECONDS
        for path in self.files:
            node = self._node(path)
            if node is None:
                continue
            try:
                wanted = {chunk.sha256 for chunk, _, _ in self.view.spans(node)} & self.hot
            except FormatError:
                continue  # its reads say why
            while not all(sha256 in self.cache for sha256 in wanted):  # the prefetch brings them in this order
                if self.stop.wait(RETRY_SECONDS) or time.monotonic() > deadline or node.ino in self.already_read:
                    break
            if self.stop.is_set() or time.monotonic() > deadline:
                break
            if node.ino in self.already_read or not wanted:
                continue
            runs = local_runs(self.view, node, self.cache)
            if runs and self._look_up(path) and not self._push(node, runs):
                break
        log.info(
            "page fill of view %s: %d files, %.1f MB put in the page cache in %.2f s",
            self.mountpoint.name,
            self.pushed_files,
            self.pushed_bytes / 1e6,
            time.monotonic() - started,
        )

    def _node(self, path: str) -> Node | None:
        node = self.view.resolve(path.encode("utf-8", "surrogateescape"))
        if node is None or not stat.S_ISREG(node.mode) or node.size == 0 or node.layer < 0:
            return None
        return node

    def _look_up(self, path: str) -> bool:
        """Make the kernel hold the file's inode: look its path up through the view's own mount."""
        try:
            os.lstat(str(self.mountpoint) + "/" + path.lstrip("/"))
        except OSError:
            return False
        return True

    def _push(self, node: Node, runs: list[tuple[int, int, list[tuple[bytes, int, int]]]]) -> bool:
        """Store the runs in the inode's page cache; False if the connection refuses notifications."""
        for begin, _end, pieces in runs:
            position = begin
            batch: list[bytes] = []
            batched = 0
            for sha256, at, size in pieces:
                data = self.cache.read(sha256, at, size)
                if data is None or len(data) != size:
                    return True  # evicted meanwhile: the start's reads fetch it
                batch.append(data)
                batched += size
                if batched >= MAX_PUSH:  # cut on a page: a page split between two notifications is kept by neither
                    joined = b"".join(batch)
                    cut = batched // PAGE * PAGE
                    if not self._store(node.ino, position, [joined[:cut]], cut):
                        return False
                    position += cut
                    batch, batched = [joined[cut:]], batched - cut
            if batch and not self._store(node.ino, position, batch, batched):
                return False
        self.pushed_files += 1
        self.pushed.append(node.ino)
        return True

    def _store(self, ino: int, offset: int, data: list[bytes], size: int) -> bool:
        header = k.OUT_HEADER.pack(k.OUT_HEADER.size + k.NOTIFY_STORE_OUT.size + size, k.NOTIFY_STORE, 0)
        try:
            os.writev(self.fd, [header, k.NOTIFY_STORE_OUT.pack(ino, offset, size, 0), *data])
        except OSError as e:
            if e.errno == errno.ENOENT:  # the kernel dropped the inode meanwhile: its reads come to us
                return True
            log.warning("view %s: the kernel refuses to take pages (%s): page fill stopped", self.mountpoint.name, e)
            return False
        self.pushed_bytes += size
        return True
