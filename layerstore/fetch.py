"""Fetching chunks from the stores: verified, retried, single-flight, through the local cache."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from layerstore.cache import ChunkCache
from layerstore.errors import FormatError, LiftoffError, ObjectNotFound, StoreError, StoreUnreachable
from layerstore.index import decompress_chunk
from layerstore.layout import chunk_key
from layerstore.retry import Backoff
from layerstore.stores import Store

log = logging.getLogger(__name__)

MAX_REQUEST_TIMEOUT = 20.0  # seconds without an answer before one store request is abandoned (a chunk is ~1 MiB)
MIN_REQUEST_TIMEOUT = 5.0


class ChunkUnavailable(LiftoffError):
    """A chunk could not be fetched and verified from any store after retries."""


@dataclass
class FetchStats:
    chunks: int = 0  # fetched from a store
    bytes: int = 0  # stored (compressed) bytes fetched
    cache_hits: int = 0
    failures: int = 0
    retries: int = 0
    seconds: float = 0.0  # summed fetch time
    per_store: dict[str, int] = field(default_factory=dict)


class ChunkFetcher:
    """Reads byte ranges of chunks: from the cache, else from the first store that serves a
    verified copy. Concurrent requests for one chunk share one fetch. Unverified bytes are
    never returned: a chunk whose content does not hash to its name is rejected and fetched
    again (from the next store, then after a backoff).

    A read fails (EIO upstream) within `retry_seconds` plus one request's timeout: the fetcher
    retries, the stores beneath it make one attempt per call (Store.single_attempt), and after
    the first round (every store tried once, so a dead first store still falls through) no
    request starts once the budget is spent. `request_timeout` defaults to retry_seconds, kept
    within 5-20 s.

    While the stores are only unreachable (refused, reset or stalled connections), a fetch pauses
    at most `unreachable_backoff` seconds between rounds, and wakes at once when any other fetch
    succeeds: readers resume as soon as a store is back. Other failures (throttling, server errors,
    corrupt data) back off fully, up to `max_backoff`."""

    def __init__(
        self,
        stores: list[Store],
        cache: ChunkCache,
        *,
        retry_seconds: float = 30.0,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        request_timeout: float | None = None,
        on_fetch: Callable[[bytes, int], None] | None = None,
        unreachable_backoff: float = 1.0,
    ) -> None:
        self.stores = stores
        if request_timeout is None:
            request_timeout = min(MAX_REQUEST_TIMEOUT, max(MIN_REQUEST_TIMEOUT, retry_seconds))
        self.request_timeout = request_timeout
        self._attempts = [store.single_attempt(request_timeout) for store in stores]
        self.cache = cache
        self.retry_seconds = retry_seconds
        self.backoff = Backoff(backoff, max_backoff)
        self.unreachable_backoff = unreachable_backoff
        self._fetched = threading.Condition()  # notified on every successful fetch
        self._successes = 0
        self.on_fetch = on_fetch
        self.stats = FetchStats()
        self._lock = threading.Lock()
        self._inflight: dict[bytes, Future[bytes]] = {}

    def read(self, sha256: bytes, size: int, offset: int, length: int, layer: str = "") -> bytes:
        """`length` bytes at `offset` of the chunk (uncompressed)."""
        data = self.cache.read(sha256, offset, length)
        if data is not None:
            self.stats.cache_hits += 1
            return data
        chunk = self.get(sha256, size, layer)
        return bytes(chunk[offset : offset + length])

    def get(self, sha256: bytes, size: int, layer: str = "") -> bytes:
        """The whole uncompressed chunk, fetching it once however many threads ask."""
        with self._lock:
            future = self._inflight.get(sha256)
            leader = future is None
            if leader:
                future = self._inflight[sha256] = Future()
        if not leader:
            return future.result()
        try:
            data = self._fetch(sha256, size, layer)
            self.cache.put(sha256, data)
            future.set_result(data)
            return data
        except BaseException as e:
            future.set_exception(e)
            raise
        finally:
            with self._lock:
                del self._inflight[sha256]

    def prefetch(self, sha256: bytes, size: int, layer: str = "") -> None:
        """Make sure the chunk is cached (no-op when it is)."""
        if sha256 not in self.cache:
            self.get(sha256, size, layer)

    def _pause(self, failures: int, deadline: float, unreachable_only: bool) -> bool:
        """Wait before the next round; False where that wait would end past the deadline. While the
        stores are only unreachable, the wait is short and ends when another fetch succeeds (so
        retries never outpace the others' successes)."""
        pause = self.backoff.delay(failures)
        if unreachable_only:
            pause = min(pause, self.unreachable_backoff)
        if time.monotonic() + pause > deadline:
            return False
        if not unreachable_only:
            time.sleep(pause)
            return True
        with self._fetched:
            successes = self._successes
            self._fetched.wait_for(lambda: self._successes != successes, timeout=pause)
        return True

    def _fetch(self, sha256: bytes, size: int, layer: str) -> bytes:
        """Try every store in order; repeat with backoff while a store fails (unreachable, corrupt
        data) and `retry_seconds` last; a chunk that every store says is absent fails after a
        second round. After the first round, no request starts once the budget is spent."""
        key = chunk_key(sha256)
        errors: list[str] = []
        deadline = time.monotonic() + self.retry_seconds
        rounds = 0
        spent = False
        while not spent:
            missing_everywhere = True
            unreachable_only = True
            for store in self._attempts:
                if rounds and time.monotonic() >= deadline:
                    spent = True
                    break
                started = time.monotonic()
                try:
                    blob = store.get(key)
                    data = decompress_chunk(blob, sha256, size, store.url)
                except ObjectNotFound:
                    errors.append(f"{store.url}: not found")
                    continue
                except (StoreError, FormatError) as e:
                    missing_everywhere = False
                    unreachable_only = unreachable_only and isinstance(e, StoreUnreachable)
                    errors.append(str(e))
                    log.warning("chunk %s of layer %s: %s", sha256.hex(), layer or "?", e)
                    continue
                elapsed = time.monotonic() - started
                with self._lock:
                    self.stats.chunks += 1
                    self.stats.bytes += len(blob)
                    self.stats.seconds += elapsed
                    self.stats.per_store[store.url] = self.stats.per_store.get(store.url, 0) + 1
                if self.on_fetch is not None:
                    self.on_fetch(sha256, len(blob))
                with self._fetched:
                    self._successes += 1
                    self._fetched.notify_all()
                return data
            rounds += 1
            if spent or (missing_everywhere and rounds >= 2) or not self._pause(rounds, deadline, unreachable_only):
                break
            with self._lock:
                self.stats.retries += 1
        with self._lock:
            self.stats.failures += 1
        stores = ", ".join(s.url for s in self.stores)
        cause = errors[-1] if errors else "no store"
        raise ChunkUnavailable(f"chunk {sha256.hex()} of layer {layer or '?'} could not be fetched from {stores}: {cause}")
