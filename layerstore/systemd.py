"""systemd's service protocols for liftoff's long-running services: readiness (sd_notify), the
file-descriptor store (FDSTORE=1 with the descriptors as SCM_RIGHTS, FDSTOREREMOVE=1) and the
descriptors it hands back at start (LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES; the first is fd 3)."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence

from layerstore.errors import LiftoffError

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3
# How often a service's main thread wakes while it waits for a stop signal. Python runs signal handlers only in
# the main thread, between bytecodes, and a lock wait there is cut short only by a signal delivered to that thread:
# one the kernel hands to another thread (gRPC's) is acted on at the main thread's next wake-up. With an hour's
# wait, a snapshotter once did not act on SIGTERM for 20 s in a loaded full-suite run (conformance suite; cause not
# proven, not reproduced in 40 tries under load): this bounds that case to half a second.
SIGNAL_POLL_SECONDS = 0.5


def _address() -> str | None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return None
    return "\0" + address[1:] if address.startswith("@") else address  # "@": an abstract socket


def notify_systemd(state: str) -> None:
    """Tell systemd (Type=notify units) about readiness or stopping, e.g. "READY=1"; a no-op outside systemd."""
    address = _address()
    if address is None:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError as e:
            log.warning("cannot notify systemd at %s: %s", address, e)


def fd_store_available() -> bool:
    """Whether systemd keeps descriptors for this service (FileDescriptorStoreMax= > 0 sets $FDSTORE)."""
    return _address() is not None and os.environ.get("FDSTORE", "0") not in ("", "0")


def notify_fds(state: str, fds: Sequence[int]) -> None:
    """Send `state` with descriptors (e.g. "FDSTORE=1\\nFDNAME=x" and the fd); LiftoffError if systemd cannot be told."""
    address = _address()
    if address is None:
        raise LiftoffError("NOTIFY_SOCKET is not set: not running under systemd")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            socket.send_fds(sock, [state.encode()], list(fds))
        except OSError as e:
            raise LiftoffError(f"cannot notify systemd at {address}: {e}") from None


def listen_fds(unset: bool = True) -> dict[str, int]:
    """The descriptors systemd passed to this process, by name (LISTEN_FDNAMES; "unknown" where
    unnamed, a later duplicate name wins). Empty when they are meant for another process (LISTEN_PID)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return {}
    names = os.environ.get("LISTEN_FDNAMES", "").split(":") if os.environ.get("LISTEN_FDNAMES") else []
    if unset:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    out: dict[str, int] = {}
    for i in range(count):
        fd = LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        name = names[i] if i < len(names) else "unknown"
        if name in out:
            os.close(out[name])
        out[name] = fd
    return out
