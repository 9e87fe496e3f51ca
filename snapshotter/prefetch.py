"""Prefetch: fetch a view's startup profile at high concurrency as soon as it is mounted, then
(if configured) the rest of its layers at a capped rate.

Where the daemon serves local files by FUSE passthrough, the profile's prefetch also completes
the files the start reads part of when few bytes are missing (at most COMPLETE_FILE_BYTES each,
COMPLETE_SHARE of the profile's bytes in all) and assembles their backing files, so that the
start's opens of them are answered with a backing file instead of reads through the daemon.

Container start never waits for it: the FUSE server's reads go straight to the fetcher
(on their own pool, so they never queue behind prefetch work), and a read of a chunk
that a prefetch is already fetching waits for that fetch instead of starting another
(the fetcher is single-flight).
"""

from __future__ import annotations

import logging
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import NamedTuple

from layerstore.errors import FormatError, LiftoffError
from layerstore.fetch import ChunkFetcher
from snapshotter.fuse_passthrough import BackingFiles
from snapshotter.fuse_tree import View

log = logging.getLogger(__name__)

COMPLETE_FILE_BYTES = 1 << 20  # complete a file the profile reads part of when at most this much of it is missing
COMPLETE_SHARE = 0.25  # and fetch at most this share of the profile's bytes on top, in all


class ProfileChunk(NamedTuple):
    """A chunk of a startup profile: its raw sha256, uncompressed size and the layer whose index names it."""

    sha256: bytes
    size: int
    layer: str = ""


class Prefetcher:
    """Runs prefetch jobs on its own threads."""

    def __init__(
        self, fetcher: ChunkFetcher, concurrency: int = 16, fill_rate: float = 0.0, backing: BackingFiles | None = None
    ) -> None:
        self.fetcher = fetcher
        self.backing = backing
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="prefetch")
        self.fill_rate = fill_rate  # bytes/s of the background fill; 0: off
        self.stats = {"profile_chunks": 0, "profile_seconds": 0.0, "fill_chunks": 0, "completed_files": 0, "completion_bytes": 0}
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

    def start(
        self, label: str, view: View | None, profile: list[ProfileChunk] | None, complete: list[ProfileChunk] | None = None
    ) -> None:
        """Prefetch `profile` (then, given a view: complete the files of `complete`, a profile, for
        passthrough, and fill the view's layers if configured) in the background."""
        threading.Thread(
            target=self._run, args=(label, view, profile or [], complete or []), name=f"prefetch-{label[:8]}", daemon=True
        ).start()

    def _run(self, label: str, view: View | None, profile: list[ProfileChunk], complete: list[ProfileChunk]) -> None:
        started = time.monotonic()
        futures = [self.pool.submit(self._one, c.sha256, c.size, c.layer) for c in profile]
        wait(futures)
        failed = sum(1 for f in futures if f.exception() is not None)
        seconds = time.monotonic() - started
        if profile:
            self.stats["profile_chunks"] += len(profile) - failed
            self.stats["profile_seconds"] = seconds
            log.info("view %s: prefetched %d profile chunks in %.2f s (%d failed)", label, len(profile) - failed, seconds, failed)
        if view is not None and complete and self.backing is not None and not self._stop.is_set():
            try:
                self._complete(label, view, complete)
            except Exception:  # a background nicety: the files are served through the daemon instead
                log.exception("view %s: completing the profile's files failed", label)
        if view is not None and self.fill_rate > 0 and not self._stop.is_set():
            self._fill(label, view)

    def _one(self, sha256: bytes, size: int, layer: str) -> None:
        try:
            self.fetcher.prefetch(sha256, size, layer)
        except LiftoffError as e:
            log.warning("prefetch of chunk %s failed: %s", sha256.hex(), e)
            raise

    def _complete(self, label: str, view: View, profile: list[ProfileChunk]) -> None:
        """Fetch the few missing chunks of the files the profile reads part of, then assemble the
        backing files of every file of the profile that is whole."""
        assert self.backing is not None
        started = time.monotonic()
        wait([self.pool.submit(self._one, c.sha256, c.size, c.layer) for c in profile])  # in flight: waits for it
        hot = {c.sha256 for c in profile}
        budget = COMPLETE_SHARE * sum(c.size for c in profile)
        extra: dict[bytes, tuple[int, str]] = {}
        spent = 0
        files = []
        for node in view.nodes[1:]:
            if node is None or not stat.S_ISREG(node.mode) or node.size == 0 or node.nlink < 1 or not node.extents:
                continue
            index = view.layers[node.layer]
            chunks = index.chunks  # extents not checked yet (View.spans): an extent outside them is skipped here
            if not any(e.chunk < len(chunks) and chunks[e.chunk].sha256 in hot for e in node.extents):
                continue
            try:
                missing = [(sha, size) for sha, size in self.backing.missing(view, node) if sha not in extra]
            except FormatError as e:
                log.warning("%s: not completing a file: %s", label, e)
                continue
            cost = sum(size for _, size in missing)
            if cost > COMPLETE_FILE_BYTES or spent + cost > budget:
                continue
            spent += cost
            extra.update((sha, (size, index.layer_digest)) for sha, size in missing)
            files.append(node)
        futures = [self.pool.submit(self._one, sha, size, layer) for sha, (size, layer) in extra.items()]
        wait(futures)
        assembled = 0
        for node in files:
            if self._stop.is_set():
                return
            if self.backing.get(view, node) is not None:
                assembled += 1
        self.stats["completed_files"] += assembled
        self.stats["completion_bytes"] += spent
        log.info(
            "view %s: %d files of the profile made whole for passthrough (%d chunks, %.1f MB fetched for it) in %.2f s",
            label,
            assembled,
            len(extra),
            spent / 1e6,
            time.monotonic() - started,
        )

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
