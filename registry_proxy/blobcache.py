"""Verified blobs on local disk, size-capped, least recently used evicted first.

Layout under the cache directory: `blobs/sha256/<2 hex>/<64 hex>` (only ever written by renaming a
fully received, digest-verified, fsynced temp file) and `tmp/` (downloads in progress, emptied at start).
Recency lives in memory and in each file's mtime (touched on every hit), so it survives a restart.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO

from layerstore.errors import LiftoffError
from registry_proxy.metrics import ProxyMetrics

log = logging.getLogger(__name__)

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
_HEX = re.compile(r"^[a-f0-9]{64}$")


class BlobCache:
    """The disk cache of blobs by digest; every method runs on the event loop's thread except sync()."""

    def __init__(self, root: Path, capacity: int, metrics: ProxyMetrics | None = None) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.tmp = root / "tmp"
        self.capacity = capacity
        self.metrics = metrics or ProxyMetrics()
        self._lru: OrderedDict[str, int] = OrderedDict()  # hex -> size, least recent first
        self.used = 0
        try:
            self.blobs.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LiftoffError(f"cannot create the blob cache under {root}: {e.strerror}; check --cache-dir") from None
        for leftover in self.tmp.iterdir():  # downloads a previous process did not finish
            leftover.unlink(missing_ok=True)
        self._scan()
        self.metrics.cache_capacity.set(capacity)
        self._evict()

    def _scan(self) -> None:
        found: list[tuple[float, str, int]] = []
        for path in self.blobs.glob("*/*"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if not _HEX.match(path.name) or path.parent.name != path.name[:2] or (st.st_size == 0 and path.name != EMPTY_SHA256):
                path.unlink(missing_ok=True)
                continue
            found.append((st.st_mtime, path.name, st.st_size))
        for _, hex_digest, size in sorted(found):
            self._lru[hex_digest] = size
            self.used += size
        self.metrics.cache_bytes.set(self.used)

    def path(self, digest: str) -> Path:
        hex_digest = digest.split(":", 1)[1]
        return self.blobs / hex_digest[:2] / hex_digest

    def __contains__(self, digest: str) -> bool:
        return digest.split(":", 1)[1] in self._lru

    def open(self, digest: str) -> tuple[BinaryIO, int] | None:
        """The cached blob opened for reading and its size, marked most recently used; None on a miss."""
        hex_digest = digest.split(":", 1)[1]
        size = self._lru.get(hex_digest)
        if size is None:
            return None
        path = self.path(digest)
        try:
            stream = open(path, "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:  # removed behind our back
            self._forget(hex_digest)
            return None
        self._lru.move_to_end(hex_digest)
        try:
            os.utime(path)
        except OSError:
            pass
        return stream, size

    def new_temp(self) -> tuple[int, Path]:
        """A new temp file (descriptor open for reading and writing) for a download."""
        path = self.tmp / uuid.uuid4().hex
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), path

    def fits(self, size: int) -> bool:
        """Whether a blob of `size` bytes is kept at all (not when larger than the whole cache)."""
        return size <= self.capacity

    @staticmethod
    def sync(fd: int) -> None:
        """Make a verified temp file's data durable (blocking: run it in a thread)."""
        os.fsync(fd)

    def admit(self, temp: Path, digest: str, size: int) -> None:
        """Rename a verified, synced temp file into place and account it, then evict down to the cap.
        On the loop's thread, so a blob's file appears exactly when the cache knows it."""
        final = self.path(digest)
        final.parent.mkdir(exist_ok=True)
        os.rename(temp, final)
        hex_digest = digest.split(":", 1)[1]
        if hex_digest in self._lru:
            self.used -= self._lru.pop(hex_digest)
        self._lru[hex_digest] = size
        self.used += size
        self._evict()
        self.metrics.cache_bytes.set(self.used)

    def _evict(self) -> None:
        while self.used > self.capacity and self._lru:
            hex_digest, _ = next(iter(self._lru.items()))
            (self.blobs / hex_digest[:2] / hex_digest).unlink(missing_ok=True)  # open readers keep their copy
            self._forget(hex_digest)
            self.metrics.evictions.inc()
            log.info("cache: evicted sha256:%s (%d bytes in cache, cap %d)", hex_digest, self.used, self.capacity)
        self.metrics.cache_bytes.set(self.used)

    def _forget(self, hex_digest: str) -> None:
        size = self._lru.pop(hex_digest, None)
        if size is not None:
            self.used -= size
