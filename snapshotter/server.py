"""Run the snapshot service: gRPC on a unix socket (0660, in a 0700 directory), stop on SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import threading
from collections.abc import Sequence
from pathlib import Path

import grpc

from layerstore.errors import LiftoffError
from layerstore.pb.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from layerstore.systemd import SIGNAL_POLL_SECONDS, notify_systemd
from snapshotter.grpcsocket import start_unix_server
from snapshotter.layout import Layout
from snapshotter.metrics import Metrics, parse_address
from snapshotter.service import SnapshotService
from snapshotter.store import PrepareHook, RemovedHook, SnapshotStore

log = logging.getLogger(__name__)

MAX_MESSAGE = 16 << 20  # containerd's gRPC message limit
SOCKET_MODE = 0o660
GRACE_SECONDS = 10.0


def prepare_socket(path: Path) -> None:
    """Make the socket's directory (0700) and clear a stale socket; refuse a shared directory or a live socket."""
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=0o700, parents=True)
        os.chmod(parent, 0o700)
    st = parent.stat()
    if stat.S_IMODE(st.st_mode) & 0o077 or st.st_uid != os.geteuid():
        raise LiftoffError(
            f"the socket directory {parent} is mode {stat.S_IMODE(st.st_mode):04o} owned by uid {st.st_uid}: it must be "
            f"a private directory (0700, ours); put the socket in a directory of its own, e.g. /run/liftoff/snapshotter.sock"
        )
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise LiftoffError(f"{path} exists and is not a socket; remove it or choose another --socket")
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(path))
            except OSError:
                os.unlink(path)  # left by a process that is gone
            else:
                raise LiftoffError(f"another process is serving on {path}; stop it or choose another --socket")


def build_server(store: SnapshotStore, socket_path: Path, metrics: Metrics, workers: int = 16) -> grpc.Server:
    """A started gRPC server answering the Snapshots API on `socket_path`."""
    prepare_socket(socket_path)
    return start_unix_server(
        socket_path,
        SOCKET_MODE,
        lambda server: pb_grpc.add_SnapshotsServicer_to_server(SnapshotService(store, metrics), server),
        workers=workers,
        name="snapshots",
        max_message=MAX_MESSAGE,
    )


def serve(
    root: str | os.PathLike[str],
    socket_path: str | os.PathLike[str],
    metrics_address: str | None = None,
    prepare_hooks: Sequence[PrepareHook] = (),
    layout: Layout | None = None,
    removed_hooks: Sequence[RemovedHook] = (),
) -> int:
    """Serve until SIGTERM or SIGINT; then finish in-flight requests (up to 10 s) and exit 0."""
    socket_path = Path(socket_path).absolute()
    if metrics_address:
        parse_address(metrics_address)  # refuse a bad address before touching anything
    store = SnapshotStore(root, prepare_hooks=prepare_hooks, layout=layout, removed_hooks=removed_hooks)
    try:
        metrics = Metrics()
        if metrics_address:
            metrics.serve(metrics_address)
        stop = threading.Event()

        def on_signal(signum, _frame) -> None:
            log.info("%s: stopping", signal.Signals(signum).name)
            stop.set()

        # Before the socket appears: a SIGTERM sent as soon as it does must stop us cleanly, not kill us.
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        server = build_server(store, socket_path, metrics)
        log.info("liftoff snapshotter serving %s on %s", store.layout.root, socket_path)
        notify_systemd("READY=1")
        while not stop.wait(SIGNAL_POLL_SECONDS):
            pass
        notify_systemd("STOPPING=1")
        server.stop(GRACE_SECONDS).wait()
        try:
            os.unlink(socket_path)
        except FileNotFoundError:
            pass
    finally:
        store.close()
    log.info("stopped")
    return 0
