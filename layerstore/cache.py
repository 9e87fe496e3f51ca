"""The local chunk cache: uncompressed chunks on disk, content-addressed, LRU-capped.

One file per chunk (`chunks/<2 hex>/<64 hex>`): chunks are ~1 MiB (small files are
packed into shared chunks), so file creation (~0.5 ms on ext4) is noise next to a
fetch, and a file per chunk makes sharing across layers and images free. A chunk is
written to a temp file and renamed into place, so a torn write is never visible under
its name; a chunk found on disk at start (possibly from before a power loss) is
hashed once before it is first served, and dropped if it does not match. The cache is
root's alone: directories 0700, chunk files created 0600 (an older cache's looser modes
are tightened at start).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

from layerstore.private import private_dir, restrict_dir, restrict_file, write_private

log = logging.getLogger(__name__)

TMP_MARK = ".tmp-"


class ChunkCache:
    """Chunks by raw sha256; `capacity` bytes at most (least recently used evicted first)."""

    def __init__(self, root: str | os.PathLike[str], capacity: int) -> None:
        private_dir(root)
        self.dir = private_dir(Path(root) / "chunks")
        self.capacity = capacity
        self._lock = threading.Lock()
        self._lru: OrderedDict[bytes, int] = OrderedDict()  # sha256 -> size, oldest first
        self._verified: set[bytes] = set()  # written or checked by this process
        self._fds: OrderedDict[bytes, int] = OrderedDict()  # open descriptors of hot chunks
        self.max_open = 256
        self.used = 0
        self.evictions = 0
        self._scan()

    def _scan(self) -> None:
        found = []
        for sub in os.scandir(self.dir):
            if not sub.is_dir(follow_symlinks=False):
                continue
            restrict_dir(Path(sub.path))
            for item in os.scandir(sub.path):
                if TMP_MARK in item.name:
                    os.unlink(item.path)  # an interrupted write
                    continue
                try:
                    st = item.stat(follow_symlinks=False)
                    restrict_file(item.path, st.st_mode)
                    found.append((st.st_mtime, bytes.fromhex(item.name), st.st_size))
                except (OSError, ValueError):
                    continue
        for _, sha256, size in sorted(found):
            self._lru[sha256] = size
            self.used += size
        if found:
            log.info("chunk cache %s: %d chunks, %.1f MB", self.dir, len(found), self.used / 1e6)
        self._evict()

    def path(self, sha256: bytes) -> Path:
        h = sha256.hex()
        return self.dir / h[:2] / h

    def __contains__(self, sha256: bytes) -> bool:
        with self._lock:
            return sha256 in self._lru

    def read(self, sha256: bytes, offset: int, length: int) -> bytes | None:
        """`length` bytes at `offset` of a cached chunk, or None if it is not (validly) cached."""
        with self._lock:
            if sha256 not in self._lru:
                return None
            self._lru.move_to_end(sha256)
            fd = self._fds.get(sha256)
            if fd is not None:
                self._fds.move_to_end(sha256)
                return os.pread(fd, length, offset)  # under the lock: eviction cannot close it meanwhile
            verified = sha256 in self._verified
        try:
            fd = os.open(self.path(sha256), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._forget(sha256)
            return None
        if not verified:
            with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
                good = hashlib.file_digest(f, "sha256").digest() == sha256
            if not good:
                os.close(fd)
                log.warning("dropping cached chunk %s: its content does not match its name", sha256.hex())
                self.discard([sha256])
                return None
        data = os.pread(fd, length, offset)
        with self._lock:
            self._verified.add(sha256)
            if sha256 in self._lru and sha256 not in self._fds:
                self._fds[sha256] = fd
                fd = -1
                while len(self._fds) > self.max_open:
                    os.close(self._fds.popitem(last=False)[1])
        if fd >= 0:
            os.close(fd)
        return data

    def open_verified(self, sha256: bytes) -> int | None:
        """A new read-only descriptor of a cached chunk whose content was checked (the caller closes
        it), or None if the chunk is not (validly) cached. A chunk evicted later stays readable through it."""
        if self.read(sha256, 0, 0) is None:  # hashes a chunk found at start, once
            return None
        try:
            return os.open(self.path(sha256), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._forget(sha256)
            return None

    def put(self, sha256: bytes, data: bytes | memoryview) -> None:
        """Store a verified chunk (temp file + rename), then evict down to capacity."""
        path = self.path(sha256)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = path.with_name(f"{path.name}{TMP_MARK}{secrets.token_hex(4)}")
        write_private(tmp, data)
        os.rename(tmp, path)
        with self._lock:
            if sha256 not in self._lru:
                self.used += len(data)
            self._lru[sha256] = len(data)
            self._lru.move_to_end(sha256)
            self._verified.add(sha256)
        self._evict(keep=sha256)

    def _evict(self, keep: bytes | None = None) -> None:
        victims = []
        with self._lock:
            while self.used > self.capacity and len(self._lru) > 1:
                sha256, size = next(iter(self._lru.items()))
                if sha256 == keep:
                    self._lru.move_to_end(sha256)
                    continue
                del self._lru[sha256]
                self._verified.discard(sha256)
                self._close(sha256)
                self.used -= size
                self.evictions += 1
                victims.append(sha256)
        for sha256 in victims:
            self.path(sha256).unlink(missing_ok=True)

    def _close(self, sha256: bytes) -> None:
        """Close a cached descriptor (lock held)."""
        fd = self._fds.pop(sha256, None)
        if fd is not None:
            os.close(fd)

    def _forget(self, sha256: bytes) -> None:
        with self._lock:
            size = self._lru.pop(sha256, None)
            if size is not None:
                self.used -= size
            self._verified.discard(sha256)
            self._close(sha256)

    def discard(self, digests: Iterable[bytes]) -> int:
        """Remove these chunks; returns how many were cached."""
        count = 0
        for sha256 in digests:
            with self._lock:
                present = sha256 in self._lru
            if present:
                self._forget(sha256)
                self.path(sha256).unlink(missing_ok=True)
                count += 1
        return count

    def retain(self, keep: set[bytes]) -> int:
        """Remove every chunk not in `keep` (space of removed images); returns how many."""
        with self._lock:
            drop = [sha256 for sha256 in self._lru if sha256 not in keep]
        return self.discard(drop)

    def digests(self) -> set[bytes]:
        with self._lock:
            return set(self._lru)
