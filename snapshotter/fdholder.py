"""`liftoff fdholder`: keeps the FUSE daemon's /dev/fuse descriptors alive while the daemon is down.

A FUSE connection lives as long as some process holds its /dev/fuse descriptor. Where systemd
runs the daemon, its file-descriptor store does this (FDSTORE=1); under Kubernetes nothing
does, so this tiny process keeps them: the daemon hands it each view's descriptor when it
mounts the view, and a new daemon (restarted after a crash, or a newer build) takes them all
back and goes on serving the same connections. It does nothing else (no store, no FUSE, no
parsing beyond its own messages), so it never needs upgrading with the daemon.

Protocol: a SOCK_SEQPACKET unix socket (0600, only the holder's own user may connect), one
JSON message per request and reply, descriptors as SCM_RIGHTS:

    {"op": "put", "name": N} + 1 fd  -> {"ok": true}     keep it (replacing one of that name)
    {"op": "remove", "name": N}      -> {"ok": true}     close it
    {"op": "get", "offset": I}       -> {"names": [...], "total": T} + those fds (at most 200 per reply)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import selectors
import signal
import socket
import struct
from pathlib import Path

from layerstore.errors import LiftoffError

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 << 10
BATCH = 200  # descriptors per reply (the kernel allows 253 per message)
SOCKET_MODE = 0o600
TIMEOUT = 10.0
_UCRED = struct.Struct("iII")


class FdHolderError(LiftoffError):
    """The holder refused a request or did not answer."""


class FdHolder:
    """The descriptors held, by name."""

    def __init__(self, socket_path: str | os.PathLike[str]) -> None:
        self.socket_path = Path(socket_path).absolute()
        self.fds: dict[str, int] = {}

    def serve(self, stop: list[bool] | None = None) -> None:
        """Answer requests until `stop[0]` becomes true (SIGTERM/SIGINT in `run`)."""
        self.socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            listener.bind(str(self.socket_path))
        finally:
            os.umask(old)
        os.chmod(self.socket_path, SOCKET_MODE)
        listener.listen(16)
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ)
        log.info("liftoff fd holder serving %s", self.socket_path)
        try:
            while not (stop and stop[0]):
                for key, _ in selector.select(1.0):
                    if key.fileobj is listener:
                        conn, _ = listener.accept()
                        if not self._trusted(conn):
                            conn.close()
                            continue
                        selector.register(conn, selectors.EVENT_READ)
                    else:
                        conn = key.fileobj  # type: ignore[assignment]
                        if not self._answer(conn):
                            selector.unregister(conn)
                            conn.close()
        finally:
            selector.close()
            listener.close()

    def _trusted(self, conn: socket.socket) -> bool:
        """Only the holder's own user (root) may hand over or take descriptors."""
        _pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        if uid != os.geteuid():
            log.warning("refused a connection from uid %d", uid)
            return False
        return True

    def _answer(self, conn: socket.socket) -> bool:
        """One request; False when the peer is gone (or broke the protocol)."""
        try:
            data, fds, _flags, _addr = socket.recv_fds(conn, MAX_MESSAGE, 4)
        except OSError:
            return False
        if not data:
            for fd in fds:
                os.close(fd)
            return False
        try:
            request = json.loads(data)
            op = request["op"]
            if op == "put" and len(fds) == 1 and isinstance(request["name"], str):
                old = self.fds.pop(request["name"], None)
                self.fds[request["name"]] = fds.pop()
                if old is not None:
                    os.close(old)
                conn.send(b'{"ok": true}')
            elif op == "remove" and not fds:
                old = self.fds.pop(str(request["name"]), None)
                if old is not None:
                    os.close(old)
                conn.send(b'{"ok": true}')
            elif op == "get" and not fds:
                offset = int(request.get("offset", 0))
                names = sorted(self.fds)[offset : offset + BATCH]
                reply = json.dumps({"names": names, "total": len(self.fds)}).encode()
                socket.send_fds(conn, [reply], [self.fds[n] for n in names])
            else:
                raise ValueError(f"bad request {request!r}")
            return True
        except (ValueError, KeyError, TypeError, OSError) as e:
            log.warning("refused a request: %s", e)
            return False
        finally:
            for fd in fds:
                os.close(fd)


class HolderClient:
    """The daemon's side of the protocol (one connection per call: calls are rare)."""

    def __init__(self, socket_path: str | os.PathLike[str]) -> None:
        self.socket_path = str(Path(socket_path).absolute())

    def _connect(self) -> socket.socket:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        conn.settimeout(TIMEOUT)
        try:
            conn.connect(self.socket_path)
        except OSError as e:
            conn.close()
            raise FdHolderError(
                f"the liftoff fd holder at {self.socket_path} is not running ({e.strerror or e}): start `liftoff fdholder` "
                "(views mounted now would not survive a restart of the FUSE daemon)"
            ) from None
        return conn

    def _call(self, conn: socket.socket, request: dict, fds: list[int] = ()) -> tuple[dict, list[int]]:  # type: ignore[assignment]
        try:
            socket.send_fds(conn, [json.dumps(request).encode()], list(fds))
            data, got, _flags, _addr = socket.recv_fds(conn, MAX_MESSAGE, BATCH + 1)
        except OSError as e:
            raise FdHolderError(f"the liftoff fd holder at {self.socket_path} failed {request['op']}: {e}") from None
        if not data:
            raise FdHolderError(f"the liftoff fd holder at {self.socket_path} refused {request['op']} (see its log)")
        return json.loads(data), got

    def put(self, name: str, fd: int) -> None:
        with self._connect() as conn:
            self._call(conn, {"op": "put", "name": name}, [fd])

    def remove(self, name: str) -> None:
        with self._connect() as conn:
            self._call(conn, {"op": "remove", "name": name})

    def take(self) -> dict[str, int]:
        """Every descriptor held, by name (duplicates: the holder keeps its own)."""
        out: dict[str, int] = {}
        with self._connect() as conn:
            while True:
                reply, fds = self._call(conn, {"op": "get", "offset": len(out)})
                names = reply["names"]
                if len(names) != len(fds):
                    for fd in fds:
                        os.close(fd)
                    raise FdHolderError(f"the liftoff fd holder at {self.socket_path} sent {len(fds)} fds for {len(names)} names")
                out.update(zip(names, fds, strict=True))
                if not names or len(out) >= reply["total"]:
                    return out


def run(args: argparse.Namespace) -> int:
    """`liftoff fdholder --socket PATH` until SIGTERM/SIGINT (then the descriptors it kept close)."""
    stop = [False]

    def stopping(*_: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, stopping)
    signal.signal(signal.SIGINT, stopping)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    FdHolder(args.socket).serve(stop)
    return 0
