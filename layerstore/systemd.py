"""systemd's readiness protocol (sd_notify) for liftoff's long-running services."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify_systemd(state: str) -> None:
    """Tell systemd (Type=notify units) about readiness or stopping, e.g. "READY=1"; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError as e:
            log.warning("cannot notify systemd at %s: %s", address, e)
