"""A TCP server on loopback that accepts every connection and never answers (a hung endpoint)."""

from __future__ import annotations

import socket
import threading


class SilentServer:
    """Accepts connections, reads nothing, sends nothing; `connections` counts them. stop() closes all."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            self._held.append(conn)

    def stop(self) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self._listener.close()
        for conn in self._held:
            conn.close()
        self._thread.join(timeout=5)
