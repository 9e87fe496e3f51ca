"""Where the views' /dev/fuse descriptors are kept while no daemon runs, so that a crash, a
restart or an upgrade of the daemon never ends a FUSE connection (running containers keep
their mounts): systemd's file-descriptor store when the daemon is a systemd service with
FileDescriptorStoreMax=, else the `liftoff fdholder` process (Kubernetes: a container of its
own that is never upgraded). Each descriptor is named by its view id."""

from __future__ import annotations

import logging
import os

from layerstore import systemd
from layerstore.errors import LiftoffError
from snapshotter.fdholder import HolderClient

log = logging.getLogger(__name__)


class FdStore:
    """Keeps descriptors by name beyond this process's life."""

    kind = "none"

    def take(self) -> dict[str, int]:
        """The descriptors kept (by an earlier daemon), by name; this process now owns its copies."""
        return {}

    def put(self, name: str, fd: int) -> None:
        """Keep (a duplicate of) `fd` under `name`, replacing what that name held."""

    def remove(self, name: str) -> None:
        """Stop keeping `name`'s descriptor."""


class HolderStore(FdStore):
    """`liftoff fdholder` at a unix socket."""

    kind = "holder"

    def __init__(self, socket_path: str) -> None:
        self.client = HolderClient(socket_path)

    def take(self) -> dict[str, int]:
        return self.client.take()

    def put(self, name: str, fd: int) -> None:
        self.client.put(name, fd)

    def remove(self, name: str) -> None:
        self.client.remove(name)


class SystemdStore(FdStore):
    """systemd's file-descriptor store of this service: kept with FDSTORE=1, handed back at the next
    start (crash included) as LISTEN_FDS/LISTEN_FDNAMES, dropped with FDSTOREREMOVE=1."""

    kind = "systemd"

    def __init__(self) -> None:
        self._passed = systemd.listen_fds()  # read once, at start: the variables are then unset

    def take(self) -> dict[str, int]:
        passed, self._passed = self._passed, {}
        return passed

    def put(self, name: str, fd: int) -> None:
        systemd.notify_fds(f"FDSTORE=1\nFDNAME={name}", [fd])

    def remove(self, name: str) -> None:
        systemd.notify_fds(f"FDSTOREREMOVE=1\nFDNAME={name}", [])


def open_fd_store(holder_socket: str | None) -> FdStore:
    """The fd holder at `holder_socket` if given, else systemd's store if this service has one, else
    none (the old behaviour: a daemon that dies takes its views' connections with it)."""
    if holder_socket:
        return HolderStore(holder_socket)
    if systemd.fd_store_available():
        return SystemdStore()
    log.warning(
        "no fd store (neither --fd-holder nor systemd's FileDescriptorStoreMax=): if this daemon dies, "
        "running containers' reads through its views fail until they restart"
    )
    return FdStore()


def close_all(fds: dict[str, int]) -> None:
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass


__all__ = ["FdStore", "HolderStore", "LiftoffError", "SystemdStore", "close_all", "open_fd_store"]
