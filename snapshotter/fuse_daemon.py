"""`liftoff fused`: the long-lived FUSE daemon that serves remote layers.

It runs apart from the gRPC snapshotter (its own process group and systemd unit with
KillMode=process), so restarting the snapshotter never touches a running container's
mounts. State lives under its root:

    fused.sock        control socket (fuse_control.py)
    indexes/<hex>     layer indexes, written by the snapshotter at pull time
    views/<id>.json   the views to serve; re-mounted at start from these alone
    mnt/<id>/         mount points
    cache/chunks/     the chunk cache (layerstore/cache.py)

All of it is root's alone (directories 0700, files 0600, layerstore/private.py), as
containerd keeps its own snapshotter state, and views are mounted nosuid,nodev: a non-root
user of the node reaches no image bytes. Containers are unaffected (overlayfs reaches its
lower layers with the credentials of whoever mounted it, and checks setuid bits and device
nodes on its own mount).

A restart needs no store: views come back from the local indexes, and only reads of
chunks not yet cached wait for the stores (retrying) once they answer again.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import logging
import os
import signal
import socketserver
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from layerstore.cache import ChunkCache
from layerstore.errors import FormatError, LiftoffError
from layerstore.fetch import ChunkFetcher
from layerstore.private import private_dir, restrict_file, write_private
from layerstore.stores import Store
from snapshotter import fuse_control
from snapshotter import fuse_kernel as k
from snapshotter.fuse_server import FuseSession
from snapshotter.fuse_tree import View
from snapshotter.index_copies import decode_copy, fetch_again
from snapshotter.prefetch import Prefetcher
from snapshotter.profile import Recorder

log = logging.getLogger(__name__)

MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


def lazy_unmount(path: Path) -> None:
    """Detach a mount (MNT_DETACH): works on dead FUSE mounts and mounts still in use."""
    if _libc.umount2(str(path).encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # EINVAL: not a mount point
            raise OSError(err, f"umount {path}: {os.strerror(err)}")


def _is_stale(path: Path) -> bool:
    try:
        os.stat(path)
        return False
    except OSError as e:
        return e.errno == errno.ENOTCONN


class IndexDir:
    """Layer indexes on local disk (the bytes as stored: zstd protobuf); a corrupt copy is fetched
    again from `stores` and replaced (snapshotter/index_copies.py)."""

    def __init__(self, root: Path, stores: Sequence[Store] = ()) -> None:
        self.stores = list(stores)
        self.root = private_dir(root)
        for path in self.root.iterdir():
            restrict_file(path)  # indexes an older liftoff wrote world-readable

    def path(self, digest: str) -> Path:
        return self.root / digest.split(":", 1)[1]

    def has(self, digest: str) -> bool:
        return self.path(digest).exists()

    def put(self, digest: str, data: bytes) -> None:
        """Write an index atomically (concurrent writers of the same index each use their own temp file)."""
        target = self.path(digest)
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        tmp.unlink(missing_ok=True)  # left by a crash of a thread with the same identity
        write_private(tmp, data)
        os.rename(tmp, target)

    def load(self, digest: str, check_extents: bool = True):
        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError:
            raise LiftoffError(f"no local index for layer {digest}: pull the image again") from None
        try:
            return decode_copy(data, digest, f"local index of {digest}", check_extents)
        except FormatError as e:
            data, index = fetch_again(self.stores, digest, e, check_extents)
        self.put(digest, data)
        return index


class MountedView:
    """A view being served: by our kernel-protocol server (`session`) or by fusepy (`thread`)."""

    def __init__(self, view_id: str, layers: list[str], layers_below: bool, view: View, mountpoint: Path) -> None:
        self.id = view_id
        self.layers = layers
        self.layers_below = layers_below
        self.view = view
        self.mountpoint = mountpoint
        self.session: FuseSession | None = None
        self.fs = None  # the fusepy operations, with the fusepy backend
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def alive(self) -> bool:
        if self.session is not None:
            return self.session.alive()
        return self.thread is not None and self.thread.is_alive()


class FuseDaemon:
    """Serves views of remote layers; controlled over fused.sock."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        stores: list[Store],
        cache_bytes: int,
        *,
        backend: str = "kernel",
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
        self.indexes = IndexDir(self.root / "indexes", stores)
        self.views_dir = private_dir(self.root / "views")
        for path in self.views_dir.iterdir():
            restrict_file(path)  # view records an older liftoff wrote world-readable
        self.mnt = private_dir(self.root / "mnt")
        self.cache = ChunkCache(self.root / "cache", cache_bytes)
        self.fetcher = ChunkFetcher(stores, self.cache, retry_seconds=fetch_retry_seconds)
        self.stores = stores
        self.views: dict[str, MountedView] = {}
        self.backend = backend
        self.max_readahead = max_readahead
        self.fetch_pool = ThreadPoolExecutor(fetch_threads, thread_name_prefix="fetch")
        self.prefetcher = Prefetcher(self.fetcher, prefetch_threads, fill_rate)
        self.learn_seconds = learn_seconds
        self.traces_dir = self.root / "traces"
        self.recordings: dict[str, Recorder] = {}
        self._lock = threading.RLock()
        self.stopping = threading.Event()

    # -- views ---------------------------------------------------------------------------

    def restore(self) -> None:
        """Mount every view recorded in views/ (after a restart), from local indexes only."""
        for spec_path in sorted(self.views_dir.glob("*.json")):
            try:
                spec = json.loads(spec_path.read_text())
                self.mount(spec["view"], spec["layers"], spec["layers_below"])
            except (LiftoffError, OSError, ValueError, KeyError) as e:
                log.error("cannot restore view %s: %s", spec_path.stem, e)

    def mount(
        self, view_id: str, layers: list[str], layers_below: bool, profile: list[dict] | None = None, image: str | None = None
    ) -> Path:
        """Mount the merged view of `layers` (bottom first) unless it is mounted; returns the mount point.

        A fresh mount starts prefetching `profile` (chunk descriptions) in the background, and
        with --learn-seconds records the first seconds of reads as a trace for `liftoff profile --merge`.
        """
        if view_id != fuse_control.view_id(layers, layers_below):
            raise LiftoffError(f"view id {view_id} does not match its layers")
        with self._lock:
            mounted = self.views.get(view_id)
            if mounted is not None and mounted.alive():
                return mounted.mountpoint
            started = time.monotonic()
            view = View([self.indexes.load(d) for d in layers], layers_below)
            mountpoint = self.mnt / view_id
            if _is_stale(mountpoint) or os.path.ismount(mountpoint):
                log.warning("clearing a stale mount at %s", mountpoint)
                lazy_unmount(mountpoint)
            mountpoint.mkdir(mode=0o700, exist_ok=True)
            mounted = MountedView(view_id, layers, layers_below, view, mountpoint)
            if self.backend == "kernel":
                mounted.session = FuseSession(view, self.fetcher, view_id, self.fetch_pool, max_readahead=self.max_readahead)
                try:
                    mounted.session.mount(mountpoint)
                except OSError as e:
                    raise LiftoffError(f"mounting view {view_id} at {mountpoint} failed: {e}") from None
            else:
                self._mount_fusepy(mounted)
            self.views[view_id] = mounted
            if profile or self.prefetcher.fill_rate:
                self.prefetcher.start(view_id, view, profile if self.prefetcher.claim(image) else None)
            if self.learn_seconds > 0:
                self._learn(mounted)
            self._write_spec(mounted)
            log.info(
                "mounted view %s (%d layers, %d inodes) at %s in %.3f s",
                view_id,
                len(layers),
                len(view.nodes) - 1,
                mountpoint,
                time.monotonic() - started,
            )
            return mountpoint

    def _set_recorder(self, mounted: MountedView, recorder: Recorder | None) -> None:
        hook = recorder.on_read if recorder else None
        if mounted.session is not None:
            mounted.session.on_read = hook
        elif mounted.fs is not None:
            mounted.fs.on_read = hook

    def record(self, view_id: str, layers: list[str], layers_below: bool) -> None:
        """Start recording the view's reads (mounting it if needed) until record_stop."""
        self.mount(view_id, layers, layers_below)
        with self._lock:
            mounted = self.views[view_id]
            recorder = self.recordings[view_id] = Recorder(mounted.view)
            self._set_recorder(mounted, recorder)

    def record_stop(self, view_id: str) -> dict:
        """Stop recording; returns the trace."""
        with self._lock:
            recorder = self.recordings.pop(view_id, None)
            if recorder is None:
                raise LiftoffError(f"view {view_id} is not being recorded")
            mounted = self.views.get(view_id)
            if mounted is not None:
                self._set_recorder(mounted, None)
        return recorder.trace()

    def _learn(self, mounted: MountedView) -> None:
        """Record the first --learn-seconds of a fresh mount and keep the trace in traces/."""
        recorder = Recorder(mounted.view, self.learn_seconds)
        self._set_recorder(mounted, recorder)

        def save() -> None:
            time.sleep(self.learn_seconds)
            self._set_recorder(mounted, None)
            trace = recorder.trace()
            if trace["chunks"]:
                private_dir(self.traces_dir)
                path = self.traces_dir / f"{mounted.id}-{int(time.time())}.json"
                tmp = path.with_suffix(".tmp")
                tmp.unlink(missing_ok=True)
                write_private(tmp, json.dumps(trace).encode())
                os.rename(tmp, path)
                log.info(
                    "view %s: kept a trace of the first %.0f s (%d chunks) in %s",
                    mounted.id,
                    self.learn_seconds,
                    len(trace["chunks"]),
                    path,
                )

        threading.Thread(target=save, name=f"learn-{mounted.id[:8]}", daemon=True).start()

    def _mount_fusepy(self, mounted: MountedView) -> None:
        """The libfuse2 path through fusepy (kept to compare against: benchmarks/fuse_micro.py)."""
        from snapshotter.fuse_fs import ViewFS, serve_view

        fs = mounted.fs = ViewFS(mounted.view, self.fetcher, mounted.id)

        def run() -> None:
            try:
                serve_view(fs, str(mounted.mountpoint))
            except BaseException as e:  # reported to the waiting mount below
                mounted.error = e
                log.error("view %s stopped: %s", mounted.id, e)

        mounted.thread = threading.Thread(target=run, name=f"view-{mounted.id[:8]}", daemon=True)
        mounted.thread.start()
        deadline = time.monotonic() + 15
        while not os.path.ismount(mounted.mountpoint):
            if not mounted.thread.is_alive() or time.monotonic() > deadline:
                raise LiftoffError(f"mounting view {mounted.id} at {mounted.mountpoint} failed: {mounted.error or 'timeout'}")
            time.sleep(0.002)

    def _write_spec(self, mounted: MountedView) -> None:
        path = self.views_dir / f"{mounted.id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)  # left by a crash (written under the daemon's lock)
        spec = {"view": mounted.id, "layers": mounted.layers, "layers_below": mounted.layers_below}
        write_private(tmp, json.dumps(spec).encode())
        os.rename(tmp, path)

    def unmount(self, view_id: str) -> None:
        """Detach a view (containers still using it keep it until they stop) and forget it."""
        with self._lock:
            mounted = self.views.pop(view_id, None)
            (self.views_dir / f"{view_id}.json").unlink(missing_ok=True)
            mountpoint = mounted.mountpoint if mounted else self.mnt / view_id
            if os.path.ismount(mountpoint) or _is_stale(mountpoint):
                lazy_unmount(mountpoint)
            try:
                mountpoint.rmdir()
            except OSError:
                pass
        log.info("unmounted view %s", view_id)

    def retain(self, layers: list[str]) -> int:
        """Drop cached chunks no listed layer references; returns how many were dropped."""
        keep: set[bytes] = set()
        for digest in layers:
            if self.indexes.has(digest):
                keep.update(chunk.sha256 for chunk in self.indexes.load(digest).chunks)
        removed = self.cache.retain(keep)
        for path in self.indexes.root.iterdir():
            if "sha256:" + path.name not in layers and ".tmp-" not in path.name:
                path.unlink(missing_ok=True)
        if removed:
            log.info("released %d cached chunks of removed layers", removed)
        return removed

    def status(self) -> dict:
        stats = self.fetcher.stats
        return {
            "views": {
                v.id: {
                    "layers": v.layers,
                    "mountpoint": str(v.mountpoint),
                    "requests": _named(v.session.requests if v.session else {}),
                }
                for v in self.views.values()
            },
            "cache": {
                "bytes": self.cache.used,
                "capacity": self.cache.capacity,
                "chunks": len(self.cache.digests()),
                "evictions": self.cache.evictions,
            },
            "fetch": {
                "chunks": stats.chunks,
                "bytes": stats.bytes,
                "cache_hits": stats.cache_hits,
                "failures": stats.failures,
                "retries": stats.retries,
            },
            "prefetch": dict(self.prefetcher.stats),
        }

    def shutdown(self) -> None:
        """Unmount every view (their specs stay, so the next start mounts them again)."""
        with self._lock:
            for mounted in list(self.views.values()):
                try:
                    lazy_unmount(mounted.mountpoint)
                except OSError as e:
                    log.warning("unmounting %s: %s", mounted.mountpoint, e)
            self.views.clear()

    # -- control -------------------------------------------------------------------------

    def handle(self, request: dict) -> dict:
        op = request.get("op")
        if op == "ping":
            return {}
        if op == "mount":
            path = self.mount(
                request["view"],
                list(request["layers"]),
                bool(request["layers_below"]),
                request.get("profile"),
                request.get("image"),
            )
            return {"mountpoint": str(path)}
        if op == "prefetch":
            if self.prefetcher.claim(request.get("image")):
                self.prefetcher.start(str(request.get("image", "?"))[7:19], None, request["profile"])
            return {}
        if op == "record":
            self.record(request["view"], list(request["layers"]), bool(request["layers_below"]))
            return {}
        if op == "record-stop":
            return {"trace": self.record_stop(request["view"])}
        if op == "unmount":
            self.unmount(request["view"])
            return {}
        if op == "views":
            return {"views": {v.id: {"layers": v.layers, "layers_below": v.layers_below} for v in self.views.values()}}
        if op == "retain":
            return {"removed": self.retain(list(request["layers"]))}
        if op == "status":
            return self.status()
        if op == "shutdown":
            self.stopping.set()
            return {}
        raise LiftoffError(f"unknown request {op!r}")


_OPCODES = {
    k.LOOKUP: "lookup",
    k.GETATTR: "getattr",
    k.READLINK: "readlink",
    k.OPEN: "open",
    k.READ: "read",
    k.STATFS: "statfs",
    k.RELEASE: "release",
    k.GETXATTR: "getxattr",
    k.LISTXATTR: "listxattr",
    k.FLUSH: "flush",
    k.INIT: "init",
    k.OPENDIR: "opendir",
    k.READDIR: "readdir",
    k.RELEASEDIR: "releasedir",
    k.ACCESS: "access",
    k.FORGET: "forget",
    k.BATCH_FORGET: "batch_forget",
    k.READDIRPLUS: "readdirplus",
    k.STATX: "statx",
}


def _named(counts: dict[int, int]) -> dict[str, int]:
    return {_OPCODES.get(op, str(op)): n for op, n in sorted(counts.items())}


def serve_control(daemon: FuseDaemon, socket_path: Path) -> socketserver.ThreadingUnixStreamServer:
    """Start answering control requests on `socket_path` (mode 0600) in a background thread."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            try:
                request = fuse_control.receive(self.request)
            except fuse_control.FusedUnavailable:
                return  # a connect-and-close probe
            except (OSError, ValueError) as e:
                log.warning("unreadable control request: %s", e)
                return
            try:
                reply = {"ok": True, **daemon.handle(request)}
            except (LiftoffError, OSError, KeyError, TypeError, ValueError) as e:
                log.warning("control request %s failed: %s", request.get("op"), e)
                reply = {"ok": False, "error": str(e)}
            try:
                fuse_control.send(self.request, reply)
            except OSError:
                pass  # the client went away

    if socket_path.exists():
        socket_path.unlink()
    old = os.umask(0o177)
    try:
        server = socketserver.ThreadingUnixStreamServer(str(socket_path), Handler)
    finally:
        os.umask(old)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="control", daemon=True).start()
    return server


def run(root: str | os.PathLike[str], stores: list[Store], cache_bytes: int, **options) -> int:
    """Run the FUSE daemon until SIGTERM/SIGINT or a shutdown request."""
    stop = threading.Event()
    # Before any mount: libfuse installs its own handlers only where none is set.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logging.getLogger("fuse").setLevel(logging.WARNING)  # fusepy logs every ENOENT/ENODATA with a traceback
    daemon = FuseDaemon(root, stores, cache_bytes, **options)
    daemon.stopping = stop
    daemon.restore()
    server = serve_control(daemon, daemon.root / "fused.sock")
    log.info("liftoff FUSE daemon serving %s (%d views)", daemon.root, len(daemon.views))
    while not stop.wait(3600):
        pass
    server.shutdown()
    daemon.shutdown()
    return 0
