"""A gRPC server on a unix socket with a given mode: the snapshotter's Snapshots API and fused's control service."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from layerstore.errors import LiftoffError


def start_unix_server(
    socket_path: Path, mode: int, add_servicers: Callable[[grpc.Server], None], *, workers: int, name: str, max_message: int
) -> grpc.Server:
    """Listen on `socket_path` (created with `mode`, never wider in between), add the servicers, start."""
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name),
        options=[("grpc.max_receive_message_length", max_message), ("grpc.max_send_message_length", max_message)],
    )
    add_servicers(server)
    old_umask = os.umask(0o777 & ~mode)
    try:
        server.add_insecure_port(f"unix:{socket_path}")
    except RuntimeError as e:
        raise LiftoffError(f"cannot listen on {socket_path}: {e}") from None
    finally:
        os.umask(old_umask)
    os.chmod(socket_path, mode)
    server.start()
    return server
