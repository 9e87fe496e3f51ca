"""The control channel between the snapshotter and the FUSE daemon: one JSON request per
connection on a unix socket, one JSON reply (`{"ok": true, ...}` or `{"ok": false, "error": ...}`).

Requests:
    {"op": "ping"}
    {"op": "mount", "view": ID, "layers": [digest, ...], "layers_below": bool, "profile": [chunk, ...]?}
                                                       -> {"mountpoint": PATH}; prefetches the profile
    {"op": "prefetch", "image": DIGEST, "profile": [chunk, ...]}  start fetching a profile (no view needed)
    {"op": "record", "view": ID, "layers": [...], "layers_below": bool}  start recording the view's reads
    {"op": "record-stop", "view": ID}                  -> {"trace": {...}} (profile.py)
    {"op": "unmount", "view": ID}
    {"op": "views"}                                    -> {"views": {ID: {...}}}
    {"op": "retain", "layers": [digest, ...]}          -> {"removed": N}  (drop cached chunks of other layers)
    {"op": "status"}                                   -> cache and fetch statistics
    {"op": "shutdown"}                                 -> unmount everything and exit (views stay recorded)
"""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

from layerstore.errors import LiftoffError

MAX_MESSAGE = 16 << 20


class FusedUnavailable(LiftoffError):
    """The FUSE daemon is not running or did not answer."""


def view_id(layers: list[str], layers_below: bool) -> str:
    """A stable name for the merged view of these layers (bottom first)."""
    text = "\n".join(layers) + ("\nbelow" if layers_below else "")
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def send(sock: socket.socket, message: dict) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def receive(sock: socket.socket) -> dict:
    data = bytearray()
    while not data.endswith(b"\n"):
        part = sock.recv(65536)
        if not part:
            break
        data += part
        if len(data) > MAX_MESSAGE:
            raise LiftoffError("control message too large")
    if not data:
        raise FusedUnavailable("the FUSE daemon closed the connection without answering")
    return json.loads(data)


class FusedClient:
    """Calls the FUSE daemon at `socket_path`."""

    def __init__(self, socket_path: str | Path, timeout: float = 120.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout

    def call(self, op: str, **fields) -> dict:
        """Send one request; raise FusedUnavailable or LiftoffError on failure."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.socket_path)
            except OSError as e:
                raise FusedUnavailable(f"the liftoff FUSE daemon is not running at {self.socket_path}: {e.strerror}") from None
            try:
                send(sock, {"op": op, **fields})
                reply = receive(sock)
            except OSError as e:
                raise FusedUnavailable(f"the liftoff FUSE daemon at {self.socket_path} did not answer {op}: {e}") from None
        if not reply.get("ok"):
            raise LiftoffError(f"FUSE daemon: {op} failed: {reply.get('error')}")
        return reply

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask the daemon to unmount everything and exit; wait until it stops answering."""
        import time

        if not self.alive():
            return
        self.call("shutdown")
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)

    def alive(self) -> bool:
        try:
            self.call("ping")
            return True
        except LiftoffError:
            return False
