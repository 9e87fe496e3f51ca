"""The FUSE daemon's wiring (indexes, views, cache, fetcher, prefetch, recordings) and its run loop."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from layerstore.cache import ChunkCache
from layerstore.errors import LiftoffError
from layerstore.fetch import ChunkFetcher
from layerstore.private import private_dir, restrict_file
from layerstore.stores import Store
from layerstore.systemd import SIGNAL_POLL_SECONDS, notify_systemd
from snapshotter.fuse_passthrough import BackingFiles
from snapshotter.fused import retention
from snapshotter.fused.fdstore import FdStore, close_all
from snapshotter.fused.indexes import IndexDir
from snapshotter.fused.metrics import FusedMetrics
from snapshotter.fused.recording import Recordings
from snapshotter.fused.views import MountedView, Views, ViewSpec
from snapshotter.page_fill import PageFill
from snapshotter.prefetch import Prefetcher, ProfileChunk

log = logging.getLogger(__name__)

SOCKET_NAME = "fused.sock"
HANDOVER_SOCKET_NAME = "handover.sock"
STOP_GRACE_SECONDS = 5.0
INFLIGHT_GRACE_SECONDS = 5.0  # a handover waits this long for reads in flight (the rest are resent)
LOCK_WAIT_SECONDS = 30.0  # --takeover: how long the old daemon may take to exit
FD_BATCH = 200


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
        fd_store: FdStore | None = None,
        resend: bool = True,
        passthrough: bool = False,
        erofs: bool = False,
        page_fill: bool = True,
        lock_wait: float = 0.0,
        metrics: FusedMetrics | None = None,
    ) -> None:
        self.root = private_dir(Path(root).absolute())
        lock_path = self.root / "fused.lock"
        self._lock_file = os.fdopen(os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600), "a+")
        restrict_file(lock_path)
        deadline = time.monotonic() + lock_wait
        while True:
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LiftoffError(f"another liftoff FUSE daemon serves {self.root}") from None
                time.sleep(0.01)
        self.fd_store = fd_store or FdStore()
        self.handed_over = False
        self.stores = stores
        self.indexes = IndexDir(self.root / "indexes", stores)
        self.cache = ChunkCache(self.root / "cache", cache_bytes)
        self.metrics = metrics
        fetch_stores = [metrics.stores.wrap(s) for s in stores] if metrics else stores  # timed per store
        self.fetcher = ChunkFetcher(fetch_stores, self.cache, retry_seconds=fetch_retry_seconds)
        self.fetch_pool = ThreadPoolExecutor(fetch_threads, thread_name_prefix="fetch")
        # whole local files for FUSE passthrough (offered at INIT where the kernel has it)
        self.backing = BackingFiles(self.root / "files", self.cache) if passthrough else None
        self.views = Views(
            self.root, self.indexes, self.fetcher, self.fetch_pool, max_readahead, self.fd_store, resend, self.backing, erofs
        )
        self.prefetcher = Prefetcher(self.fetcher, prefetch_threads, fill_rate, self.backing)
        self.recordings = Recordings(self.root / "traces", learn_seconds)
        self.page_fill = page_fill
        self._fill_lock = threading.Lock()
        self.stopping = threading.Event()
        self.shutdown_requested = False  # Shutdown RPC: unmount everything (SIGTERM with an fd store: leave)
        if metrics is not None:
            metrics.attach(self)

    def restore(self, fds: dict[str, int] | None = None) -> None:
        """Serve every view recorded in views/ (after a restart), from local indexes only: on the
        connection an earlier daemon left (`fds`, by view id) where there is one, else mounted afresh."""
        fds = dict(fds or {})
        for record in self.views.recorded():
            if isinstance(record, tuple):
                log.error("cannot restore view %s: %s", *record)
                continue
            spec = record.spec
            try:
                fd = fds.pop(spec.view_id, None)
                if fd is not None and self.views.attach(record, fd) is not None:
                    continue
                self.mount(spec)
            except (LiftoffError, OSError, ValueError, KeyError) as e:
                log.error("cannot restore view %s: %s", spec.view_id, e)
        for view_id, fd in fds.items():  # connections of views no longer recorded (unmounted meanwhile)
            log.info("ending the FUSE connection of view %s: it is no longer recorded", view_id)
            self.views._forget_fd(view_id, fd)

    def hand_over(self, fd_socket: str) -> tuple[list[str], int]:
        """Stop serving (without unmounting), answer the reads in flight, and send every view's
        descriptor to the new daemon listening at `fd_socket`; this daemon then exits."""
        fds, unanswered = self.views.stop_all(INFLIGHT_GRACE_SECONDS)
        self.prefetcher.stop()
        send_fds(fd_socket, fds)
        self.handed_over = True
        self.stopping.set()
        log.info("handed %d views over (%d reads in flight left to be resent)", len(fds), unanswered)
        return sorted(fds), unanswered

    def mount(
        self,
        spec: ViewSpec,
        profile: list[ProfileChunk] | None = None,
        image: str | None = None,
        files: list[str] | None = None,
    ) -> Path:
        """Mount a view unless it is mounted; returns the mount point. A fresh mount starts prefetching
        `profile` (once per image) and, with --learn-seconds, records its first seconds. Given the
        profile's `files`, the view's page cache is filled with their bytes as they come (once per
        view, even if a container's mount came first; not while the view is recorded)."""
        mounted, fresh = self.views.mount(spec)
        if fresh:
            if self.metrics is not None:
                self.metrics.prefetching(image, profile)
            if profile or self.prefetcher.fill_rate:
                self.prefetcher.start(
                    spec.view_id, mounted.view, profile if self.prefetcher.claim(image) else None, complete=profile
                )
            self.recordings.learn(mounted)
        if profile and files and self.page_fill:
            self._fill(mounted, profile, files)
        return mounted.mountpoint

    def _fill(self, mounted: MountedView, profile: list[ProfileChunk], files: list[str]) -> None:
        """Start the view's page fill, unless it has had one, is recorded (the pages would hide the
        start's reads from the recording) or is not read through FUSE alone (EROFS, passthrough)."""
        session = mounted.session
        with self._fill_lock:
            if mounted.fill is not None or mounted.erofs or mounted.on_read is not None or session.states is not None:
                return
            order = [chunk.sha256 for chunk in profile]
            fill = PageFill(session.fd, mounted.view, mounted.mountpoint, files, order, self.cache, session.read_inos)
            mounted.fill = fill.start()

    def prefetch(self, image: str, profile: list[ProfileChunk]) -> None:
        """Fetch an image's startup profile into the cache, before any view of it exists (once per image)."""
        if self.prefetcher.claim(image):
            if self.metrics is not None:
                self.metrics.prefetching(image, profile)
            self.prefetcher.start(image[7:19] or "?", None, profile)

    def start_recording(self, spec: ViewSpec) -> None:
        """Record the view's reads (mounting it if needed) until stop_recording."""
        self.mount(spec)
        mounted = self.views.get(spec.view_id)
        if mounted is None:
            raise LiftoffError(f"view {spec.view_id} was unmounted meanwhile")
        with self._fill_lock:  # no page fill starts once the recording has
            self.recordings.start(mounted)
            fill = mounted.fill
        if fill is not None:  # pages given ahead would hide the start's reads from the recording
            fill.drop()

    def stop_recording(self, view_id: str) -> dict:
        return self.recordings.stop(view_id)

    def retain(self, layers: list[str]) -> int:
        return retention.retain(self.indexes, self.cache, layers, self.backing)

    def shutdown(self) -> None:
        """Unmount every view (their records stay, so the next start mounts them again)."""
        self.views.detach_all()
        self.prefetcher.stop()

    def leave(self) -> None:
        """Stop serving without unmounting: the connections stay in the fd store, and the next daemon
        takes them back (SIGTERM of a daemon with an fd store: systemctl restart, a pod replaced)."""
        _fds, unanswered = self.views.stop_all(INFLIGHT_GRACE_SECONDS)
        self.prefetcher.stop()
        log.info("left %d views to the next daemon (%d reads in flight left to be resent)", len(_fds), unanswered)


def send_fds(path: str, fds: dict[str, int]) -> None:
    """Send descriptors by name to a new daemon's handover socket (SOCK_SEQPACKET, batches of names + SCM_RIGHTS)."""
    names = sorted(fds)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as conn:
        conn.settimeout(30)
        conn.connect(path)
        for start in range(0, len(names), FD_BATCH) or [0]:
            batch = names[start : start + FD_BATCH]
            head = json.dumps({"names": batch, "total": len(names)}).encode()
            socket.send_fds(conn, [head], [fds[n] for n in batch])
        conn.recv(16)  # the new daemon has them all


def take_over(root: Path, timeout: float = 60.0) -> dict[str, int]:
    """--takeover: ask the daemon serving `root` to hand its views over (Handover RPC) and receive
    their descriptors on a side socket; {} when no daemon answers (an ordinary start)."""
    from snapshotter.fuse_control import FusedClient

    client = FusedClient(root / SOCKET_NAME, timeout=timeout)
    if not client.alive():
        log.info("--takeover: no daemon answers at %s; starting afresh", root / SOCKET_NAME)
        return {}
    client.check(["handover"])  # FusedIncompatible names both versions
    side = root / HANDOVER_SOCKET_NAME
    side.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        listener.bind(str(side))
    finally:
        os.umask(old)
    listener.listen(1)
    listener.settimeout(timeout)
    received: dict[str, int] = {}
    failure: list[BaseException] = []

    def receive() -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(timeout)
                while True:
                    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 20, FD_BATCH + 1)
                    head = json.loads(data)
                    received.update(zip(head["names"], fds, strict=True))
                    if len(received) >= head["total"]:
                        conn.send(b"ok")
                        return
        except (OSError, ValueError, KeyError) as e:
            failure.append(e)

    receiver = threading.Thread(target=receive, name="handover", daemon=True)
    receiver.start()
    try:
        version = client.handover(str(side))
    finally:
        receiver.join(timeout)
        listener.close()
        side.unlink(missing_ok=True)
        client.close()
    if failure:
        close_all(received)
        raise LiftoffError(f"--takeover: receiving the views' descriptors failed: {failure[0]}")
    log.info("--takeover: %s handed over %d views", version, len(received))
    return received


def run(
    root: str | os.PathLike[str],
    stores: list[Store],
    cache_bytes: int,
    *,
    fd_store: FdStore | None = None,
    takeover: bool = False,
    metrics_address: str | None = None,
    **options,
) -> int:
    """Run the FUSE daemon until SIGTERM/SIGINT, a Shutdown request or a handover to a new daemon."""
    from snapshotter.fused.control import serve_control

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    fd_store = fd_store or FdStore()
    metrics = FusedMetrics() if metrics_address else None
    if metrics is not None:
        metrics.serve(metrics_address)  # /healthz says 503 until the views are restored
    handed = take_over(private_dir(Path(root).absolute())) if takeover else {}
    daemon = FuseDaemon(
        root, stores, cache_bytes, fd_store=fd_store, lock_wait=LOCK_WAIT_SECONDS if takeover else 0.0, metrics=metrics, **options
    )
    daemon.stopping = stop
    fds = fd_store.take()
    for name, fd in handed.items():  # the same connections: keep one descriptor of each
        if name in fds:
            os.close(fds[name])
        fds[name] = fd
    daemon.restore(fds)
    socket_path = daemon.root / SOCKET_NAME
    server = serve_control(daemon, socket_path)
    if metrics is not None:
        metrics.serving(socket_path)
    log.info(
        "liftoff FUSE daemon serving %s (%d views, fd store: %s, %d re-attached connections resent)",
        daemon.root,
        len(daemon.views.all()),
        fd_store.kind,
        daemon.views.resent,
    )
    notify_systemd("READY=1")
    while not stop.wait(SIGNAL_POLL_SECONDS):
        pass
    notify_systemd("STOPPING=1")
    if daemon.handed_over:
        server.stop(0.5).wait()  # the new daemon replaces the socket
        _exit_now(daemon)
    server.stop(STOP_GRACE_SECONDS).wait()
    if daemon.shutdown_requested or fd_store.kind == "none":
        socket_path.unlink(missing_ok=True)
        daemon.shutdown()
        return 0
    daemon.leave()
    _exit_now(daemon)
    return 0


def _exit_now(daemon: FuseDaemon) -> None:
    """Exit at once once the views are left to the next daemon: fetches still retrying an unreachable
    store must not hold the lock (and so the next daemon) back; what they would answer is resent."""
    daemon._lock_file.close()
    logging.shutdown()
    os._exit(0)
