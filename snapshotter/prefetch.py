"""Prefetch: fetch a view's startup profile at high concurrency as soon as it is mounted, then
(if configured) the rest of its layers at a capped rate.

Container start never waits for it: the FUSE server's reads go straight to the fetcher
(on their own pool, so they never queue behind prefetch work), and a read of a chunk
that a prefetch is already fetching waits for that fetch instead of starting another
(the fetcher is single-flight).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import NamedTuple

from layerstore.errors import LiftoffError
from layerstore.fetch import ChunkFetcher
from snapshotter.fuse_tree import View

log = logging.getLogger(__name__)


class ProfileChunk(NamedTuple):
    """A chunk of a startup profile: its raw sha256, uncompressed size and the layer whose index names it."""

    sha256: bytes
    size: int
    layer: str = ""


class Prefetcher:
    """Runs prefetch jobs on its own threads."""

    def __init__(self, fetcher: ChunkFetcher, concurrency: int = 16, fill_rate: float = 0.0) -> None:
        self.fetcher = fetcher
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="prefetch")
        self.fill_rate = fill_rate  # bytes/s of the background fill; 0: off
        self.stats = {"profile_chunks": 0, "profile_seconds": 0.0, "fill_chunks": 0}
        self._stop = threading.Event()
        self._claimed: set[str] = set()
        self._lock = threading.Lock()

    def claim(self, image: str | None) -> bool:
        """True once per image: whether the caller should start that image's profile (False if already begun)."""
        if not image:
            return True
        with self._lock:
            if image in self._claimed:
                return False
            self._claimed.add(image)
            return True

    def start(self, label: str, view: View | None, profile: list[ProfileChunk] | None) -> None:
        """Prefetch `profile` (then fill the view's layers, if configured and a view is given) in the background."""
        threading.Thread(target=self._run, args=(label, view, profile or []), name=f"prefetch-{label[:8]}", daemon=True).start()

    def _run(self, label: str, view: View | None, profile: list[ProfileChunk]) -> None:
        started = time.monotonic()
        futures = [self.pool.submit(self._one, c.sha256, c.size, c.layer) for c in profile]
        wait(futures)
        failed = sum(1 for f in futures if f.exception() is not None)
        seconds = time.monotonic() - started
        if profile:
            self.stats["profile_chunks"] += len(profile) - failed
            self.stats["profile_seconds"] = seconds
            log.info("view %s: prefetched %d profile chunks in %.2f s (%d failed)", label, len(profile) - failed, seconds, failed)
        if view is not None and self.fill_rate > 0 and not self._stop.is_set():
            self._fill(label, view)

    def _one(self, sha256: bytes, size: int, layer: str) -> None:
        try:
            self.fetcher.prefetch(sha256, size, layer)
        except LiftoffError as e:
            log.warning("prefetch of chunk %s failed: %s", sha256.hex(), e)
            raise

    def _fill(self, label: str, view: View) -> None:
        """Fetch every other chunk of the view's layers, one at a time, at most fill_rate bytes/s."""
        budget_start, sent = time.monotonic(), 0
        for index in view.layers:
            for chunk in index.chunks:
                if self._stop.is_set():
                    return
                if chunk.sha256 in self.fetcher.cache:
                    continue
                try:
                    self.fetcher.prefetch(chunk.sha256, chunk.size, index.layer_digest)
                except LiftoffError as e:
                    log.warning("background fill of view %s: %s", label, e)
                    continue
                self.stats["fill_chunks"] += 1
                sent += chunk.stored_size
                ahead = sent / self.fill_rate - (time.monotonic() - budget_start)
                if ahead > 0:
                    time.sleep(ahead)
        log.info("view %s: background fill done", label)

    def stop(self) -> None:
        self._stop.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
