"""Put a start's local bytes in the kernel's page cache before the start reads them.

A first start reads its files through the view: each page the kernel lacks costs a FUSE READ
round trip through the daemon, one after the other on the start's critical path. The startup
profile names the files a start reads, in first-access order, and the profile's prefetch puts
their chunks in the chunk cache in that order. `PageFill` walks those files beside the start: as
soon as a file's first chunk is cached, it makes sure the kernel holds the file's inode (asking
first with an empty store, else looking the path up through the view's own mount) and pushes the
file's cached bytes into the inode's page cache with FUSE_NOTIFY_STORE, so that the start's reads
are answered by the kernel. A file whose profile chunks come later (a large library read here and
there) is taken up again as they come. Small files the start has read already are skipped;
nothing here changes what a read returns (the pages pushed are the file's own bytes).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
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
FILE_WAIT_SECONDS = 2.0  # a file whose first chunk is late is taken up again later; the next ones go on
SMALL_FILE = 128 << 10  # a file the start has read is skipped if one READ (128 KiB) answered it


class _File:
    """A file of the profile being filled: its extents whose chunks the profile brings (by their
    rank in the profile), and those given to the kernel so far."""

    __slots__ = ("counted", "given", "held", "node", "path", "spans", "wanted")

    def __init__(self, path: str, node: Node, spans: list, wanted: dict[int, int]) -> None:
        self.path = path
        self.node = node
        self.spans = spans
        self.wanted = wanted
        self.given: set[int] = set()
        self.held = False  # the kernel holds the inode (asked, or looked up)
        self.counted = False

    def pending(self) -> set[int]:
        return self.wanted.keys() - self.given

    def next_chunk(self) -> bytes:
        """The chunk of the first of its pending extents the prefetch brings."""
        number = min(self.pending(), key=self.wanted.__getitem__)
        return self.spans[number][0].sha256


Run = tuple[int, int, list[tuple[bytes, int, int]]]  # file start, end, pieces (sha256, offset in chunk, length)


def local_runs(view: View, node: Node, cache: ChunkCache, skip: AbstractSet[int] = frozenset()) -> tuple[list[Run], set[int]]:
    """The file's byte ranges whose chunks are cached, around its extents not numbered in `skip`
    (those given already), in whole pages (the kernel keeps a partial page only at the end of the
    file: a page across an extent's edge is taken from the cached neighbour where there is one);
    and the numbers of the extents they cover."""
    runs: list[Run] = []
    covered: set[int] = set()
    position = 0
    pieces: list[tuple[bytes, int, int]] = []  # the current stretch of cached extents
    begin = lo = hi = 0
    for number, (chunk, at, size) in enumerate([*view.spans(node), (None, 0, 0)]):
        if chunk is not None and chunk.sha256 in cache:
            if not pieces:
                begin, lo, hi = position, -1, -1
            pieces.append((chunk.sha256, at, size))
            if number not in skip:
                covered.add(number)
                lo = position if lo < 0 else lo
                hi = position + size
        elif pieces:  # a stretch ends: its new extents, widened to whole pages inside it
            end = position
            if lo >= 0:
                first = lo // PAGE * PAGE
                first = first if first >= begin else -(-begin // PAGE) * PAGE
                last = -(-hi // PAGE) * PAGE
                last = last if last <= end else (end if end >= node.size else end // PAGE * PAGE)
                if last > first:
                    runs.append((first, last, _trim(pieces, first - begin, last - begin)))
            pieces = []
        position += size
    return runs, covered


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
        profile: Sequence[bytes],
        cache: ChunkCache,
        already_read: set[int],
    ) -> None:
        self.fd = fd
        self.view = view
        self.mountpoint = mountpoint
        self.files = list(files)
        self.rank = {sha256: i for i, sha256 in enumerate(profile)}  # the profile's chunks, in the prefetch's order
        self.cache = cache
        self.already_read = already_read  # inodes the view has served a READ for (the start got there first)
        self.stop = threading.Event()
        self.pushed_files = 0
        self.pushed_bytes = 0
        self.pushed: list[int] = []  # inodes given pages
        self.looked_up = 0
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
        later: list[_File] = []  # files with profile chunks still to come
        for path in self.files:
            file = self._file(path)
            if file is None:
                continue
            first = file.next_chunk()
            waited = time.monotonic() + FILE_WAIT_SECONDS
            while first not in self.cache and time.monotonic() < waited:  # the prefetch brings them in this order
                later = self._revisit(later)
                if self.stop.wait(RETRY_SECONDS) or time.monotonic() > deadline:
                    break
            if self.stop.is_set() or time.monotonic() > deadline:
                break
            if first in self.cache and not self._fill(file):
                break
            if file.pending():
                later.append(file)  # taken up again as the rest comes
        while later and not self.stop.is_set() and time.monotonic() < deadline:
            later = self._revisit(later)
            if later:
                self.stop.wait(RETRY_SECONDS)
        log.info(
            "page fill of view %s: %d files (%d looked up), %.1f MB put in the page cache in %.2f s",
            self.mountpoint.name,
            self.pushed_files,
            self.looked_up,
            self.pushed_bytes / 1e6,
            time.monotonic() - started,
        )

    def _file(self, path: str) -> _File | None:
        node = self._node(path)
        if node is None:
            return None
        try:
            spans = self.view.spans(node)
        except FormatError:
            return None  # its reads say why
        wanted = {n: self.rank[chunk.sha256] for n, (chunk, _, _) in enumerate(spans) if chunk.sha256 in self.rank}
        return _File(path, node, spans, wanted) if wanted else None

    def _revisit(self, files: list[_File]) -> list[_File]:
        """Fill what has come of the files waiting for more of their chunks; those still waiting."""
        left = []
        for file in files:
            if self.stop.is_set():
                return []
            if any(file.spans[n][0].sha256 in self.cache for n in file.pending()) and not self._fill(file):
                self.stop.set()
                return []
            if file.pending():
                left.append(file)
        return left

    def _fill(self, file: _File) -> bool:
        """Push the file's cached bytes not pushed yet; False if the connection refuses notifications."""
        node = file.node
        if node.size <= SMALL_FILE and node.ino in self.already_read:  # one READ has answered it already
            file.given.update(file.wanted)
            return True
        runs, covered = local_runs(self.view, node, self.cache, file.given)
        file.given |= covered
        if not runs:
            return True
        if not file.held:
            if not (self._held(node.ino) or self._look_up(file.path)):
                file.given.update(file.wanted)  # it cannot be looked up: left to the start's reads
                return True
            file.held = True
        pushed = self._push(node, runs)
        if pushed is None:  # the kernel dropped the inode meanwhile
            file.held = False
            return True
        if pushed and not file.counted:
            file.counted = True
            self.pushed_files += 1
            self.pushed.append(node.ino)
        return pushed

    def _node(self, path: str) -> Node | None:
        node = self.view.resolve(path.encode("utf-8", "surrogateescape"))
        if node is None or not stat.S_ISREG(node.mode) or node.size == 0 or node.layer < 0:
            return None
        return node

    def _held(self, ino: int) -> bool:
        """Whether the kernel holds the inode already (the start listed its directory, or looked it up):
        an empty store, which the kernel answers ENOENT for an inode it does not hold."""
        return self._store(ino, 0, [], 0) is not None

    def _look_up(self, path: str) -> bool:
        """Make the kernel hold the file's inode: look its path up through the view's own mount."""
        self.looked_up += 1
        try:
            os.lstat(str(self.mountpoint) + "/" + path.lstrip("/"))
        except OSError:
            return False
        return True

    def _push(self, node: Node, runs: list[Run]) -> bool | None:
        """Store the runs in the inode's page cache: True if done, None if the kernel does not hold the
        inode (any more), False if the connection refuses notifications."""
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
                    stored = self._store(node.ino, position, [joined[:cut]], cut)
                    if not stored:
                        return stored
                    position += cut
                    batch, batched = [joined[cut:]], batched - cut
            stored = self._store(node.ino, position, batch, batched) if batch else True
            if not stored:
                return stored
        return True

    def _store(self, ino: int, offset: int, data: list[bytes], size: int) -> bool | None:
        """Store bytes in the inode's page cache: True if done (or moot), None if the kernel does not
        hold the inode, False if the connection refuses notifications."""
        header = k.OUT_HEADER.pack(k.OUT_HEADER.size + k.NOTIFY_STORE_OUT.size + size, k.NOTIFY_STORE, 0)
        try:
            os.writev(self.fd, [header, k.NOTIFY_STORE_OUT.pack(ino, offset, size, 0), *data])
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            log.warning("view %s: the kernel refuses to take pages (%s): page fill stopped", self.mountpoint.name, e)
            return False
        self.pushed_bytes += size
        return True
