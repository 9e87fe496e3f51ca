"""Hash, compress and upload chunks on a thread pool, skipping what the stores already hold."""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import zstandard

from layerstore.errors import StoreError
from layerstore.layout import chunk_key
from layerstore.stores import Store


@dataclass(frozen=True)
class ChunkInfo:
    """What the index records about a chunk, and whether this run uploaded it."""

    sha256: bytes
    size: int
    stored_size: int
    uploaded: int  # compressed bytes this run wrote, summed over stores


@dataclass
class UploadStats:
    chunks: int = 0
    chunks_new: int = 0
    raw_bytes: int = 0
    raw_bytes_new: int = 0
    bytes_uploaded: int = 0  # compressed bytes written, summed over stores


class ChunkUploader:
    """Accepts chunks in order; each is processed by a worker:

    sha256 -> skip if already handled in this run -> ask every store whether it
    has the object (HEADs run concurrently across workers) -> zstd-compress
    only if some store lacks it -> write it to those stores.

    At most `max_pending` chunks are in memory at once: submit() blocks
    beyond that, which bounds memory whatever the image size.
    """

    def __init__(self, stores: list[Store], *, workers: int = 8, max_pending: int = 32, level: int = 3) -> None:
        self.stores = stores
        self.level = level
        self.stats = UploadStats()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="chunk")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._lock = threading.Lock()
        self._done: dict[bytes, int] = {}  # sha256 -> stored size, present in every store
        self._inflight: dict[bytes, threading.Event] = {}
        self._local = threading.local()

    def submit(self, data: memoryview) -> Future[ChunkInfo]:
        """Queue one chunk; the future resolves once it is in every store."""
        self._slots.acquire()
        try:
            future = self._pool.submit(self._process, data)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def _compressor(self) -> zstandard.ZstdCompressor:
        compressor = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = self._local.compressor = zstandard.ZstdCompressor(level=self.level, write_content_size=True)
        return compressor

    def _process(self, data: memoryview) -> ChunkInfo:
        sha256 = hashlib.sha256(data).digest()
        size = len(data)
        with self._lock:
            stored = self._done.get(sha256)
            self.stats.chunks += 1
            self.stats.raw_bytes += size
            leader = stored is None and sha256 not in self._inflight
            if leader:
                self._inflight[sha256] = threading.Event()
            waiting = self._inflight.get(sha256)
        if stored is not None:
            return ChunkInfo(sha256, size, stored, uploaded=0)
        if not leader:  # the same content is being uploaded by another worker: wait for it
            waiting.wait()
            with self._lock:
                stored = self._done.get(sha256)
            if stored is None:
                raise StoreError(f"chunk {sha256.hex()}: the upload of identical content failed")
            return ChunkInfo(sha256, size, stored, uploaded=0)
        try:
            return self._upload(sha256, data)
        finally:
            with self._lock:
                self._inflight.pop(sha256).set()

    def _upload(self, sha256: bytes, data: memoryview) -> ChunkInfo:
        size = len(data)
        key = chunk_key(sha256)
        sizes = [store.size(key) for store in self.stores]
        missing = [store for store, found in zip(self.stores, sizes, strict=True) if found is None]
        if missing:
            blob = self._compressor().compress(data)
            for store in missing:
                store.put(key, blob)
            stored = len(blob)
        else:
            stored = sizes[0]
        with self._lock:
            self._done[sha256] = stored
            if missing:
                self.stats.chunks_new += 1
                self.stats.raw_bytes_new += size
                self.stats.bytes_uploaded += stored * len(missing)
        return ChunkInfo(sha256, size, stored, uploaded=stored * len(missing))

    def close(self) -> None:
        """Wait for queued work and stop the workers."""
        self._pool.shutdown(wait=True)
