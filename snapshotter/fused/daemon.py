"""The FUSE daemon's wiring (indexes, views, cache, fetcher, prefetch, recordings) and its run loop."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from layerstore.cache import ChunkCache
from layerstore.errors import LiftoffError
from layerstore.fetch import ChunkFetcher
from layerstore.private import private_dir, restrict_file
from layerstore.stores import Store
from layerstore.systemd import notify_systemd
from snapshotter.fused import retention
from snapshotter.fused.indexes import IndexDir
from snapshotter.fused.recording import Recordings
from snapshotter.fused.views import Views, ViewSpec
from snapshotter.prefetch import Prefetcher, ProfileChunk

log = logging.getLogger(__name__)

SOCKET_NAME = "fused.sock"
STOP_GRACE_SECONDS = 5.0


class FuseDaemon:
    """Serves views of remote layers from the state under `root` (one daemon per root)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        stores: list[Store],
        cache_bytes: int,
        *,
        max_readahead: int = 128 << 10,
        fetch_threads: int = 32,
        prefetch_threads: int = 16,
        fill_rate: float = 0.0,
        learn_seconds: float = 0.0,
        fetch_retry_seconds: float = 30.0,
    ) -> None:
        self.root = private_dir(Path(root).absolute())
        lock_path = self.root / "fused.lock"
        self._lock_file = os.fdopen(os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600), "a+")
        restrict_file(lock_path)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LiftoffError(f"another liftoff FUSE daemon serves {self.root}") from None
        self.stores = stores
        self.indexes = IndexDir(self.root / "indexes", stores)
        self.cache = ChunkCache(self.root / "cache", cache_bytes)
        self.fetcher = ChunkFetcher(stores, self.cache, retry_seconds=fetch_retry_seconds)
        self.fetch_pool = ThreadPoolExecutor(fetch_threads, thread_name_prefix="fetch")
        self.views = Views(self.root, self.indexes, self.fetcher, self.fetch_pool, max_readahead)
        self.prefetcher = Prefetcher(self.fetcher, prefetch_threads, fill_rate)
        self.recordings = Recordings(self.root / "traces", learn_seconds)
        self.stopping = threading.Event()

    def restore(self) -> None:
        """Mount every view recorded in views/ (after a restart), from local indexes only."""
        for spec in self.views.recorded():
            if isinstance(spec, tuple):
                log.error("cannot restore view %s: %s", *spec)
                continue
            try:
                self.mount(spec)
            except (LiftoffError, OSError, ValueError, KeyError) as e:
                log.error("cannot restore view %s: %s", spec.view_id, e)

    def mount(self, spec: ViewSpec, profile: list[ProfileChunk] | None = None, image: str | None = None) -> Path:
        """Mount a view unless it is mounted; returns the mount point. A fresh mount starts prefetching
        `profile` (once per image) and, with --learn-seconds, records its first seconds."""
        mounted, fresh = self.views.mount(spec)
        if fresh:
            if profile or self.prefetcher.fill_rate:
                self.prefetcher.start(spec.view_id, mounted.view, profile if self.prefetcher.claim(image) else None)
            self.recordings.learn(mounted)
        return mounted.mountpoint

    def prefetch(self, image: str, profile: list[ProfileChunk]) -> None:
        """Fetch an image's startup profile into the cache, before any view of it exists (once per image)."""
        if self.prefetcher.claim(image):
            self.prefetcher.start(image[7:19] or "?", None, profile)

    def start_recording(self, spec: ViewSpec) -> None:
        """Record the view's reads (mounting it if needed) until stop_recording."""
        self.mount(spec)
        mounted = self.views.get(spec.view_id)
        if mounted is None:
            raise LiftoffError(f"view {spec.view_id} was unmounted meanwhile")
        self.recordings.start(mounted)

    def stop_recording(self, view_id: str) -> dict:
        return self.recordings.stop(view_id)

    def retain(self, layers: list[str]) -> int:
        return retention.retain(self.indexes, self.cache, layers)

    def shutdown(self) -> None:
        """Unmount every view (their records stay, so the next start mounts them again)."""
        self.views.detach_all()
        self.prefetcher.stop()


def run(root: str | os.PathLike[str], stores: list[Store], cache_bytes: int, **options) -> int:
    """Run the FUSE daemon until SIGTERM/SIGINT or a Shutdown request."""
    from snapshotter.fused.control import serve_control

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    daemon = FuseDaemon(root, stores, cache_bytes, **options)
    daemon.stopping = stop
    daemon.restore()
    socket_path = daemon.root / SOCKET_NAME
    server = serve_control(daemon, socket_path)
    log.info("liftoff FUSE daemon serving %s (%d views)", daemon.root, len(daemon.views.all()))
    notify_systemd("READY=1")
    while not stop.wait(3600):
        pass
    notify_systemd("STOPPING=1")
    server.stop(STOP_GRACE_SECONDS).wait()
    socket_path.unlink(missing_ok=True)
    daemon.shutdown()
    return 0
