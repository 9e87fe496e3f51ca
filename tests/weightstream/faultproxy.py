"""A real HTTP proxy in front of the S3 server that injects the faults a network produces.

Each client connection gets its own upstream connection; requests are relayed
one at a time. Requests that match (by default: ranged GETs of data, i.e. not
the header probe that starts at byte 0) consume the next fault from a queue:

- "503":      answered by the proxy itself with an S3 SlowDown error (the server never sees it)
- "reset":    half the body, then the connection is reset (RST)
- "truncate": the full Content-Length is announced, half the body sent, then a clean close (FIN)
- "stall":    half the body, then silence for `stall_seconds`, then close
- "pass":     relayed untouched
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
import time
from collections import deque
from collections.abc import Callable


def _read_head(sock: socket.socket, buffer: bytearray) -> bytes | None:
    """Bytes up to and including the blank line; the rest stays in `buffer`."""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        if not data:
            return None
        buffer += data
    end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:end])
    del buffer[:end]
    return head


def _header(head: bytes, name: str) -> str | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.lower().encode():
            return value.strip().decode()
    return None


def _read_exact(sock: socket.socket, buffer: bytearray, n: int) -> bytes:
    while len(buffer) < n:
        data = sock.recv(1 << 20)
        if not data:
            break
        buffer += data
    body = bytes(buffer[:n])
    del buffer[:n]
    return body


def is_data_range(request_head: bytes) -> bool:
    """A ranged GET that is not the header probe (which starts at byte 0)."""
    value = _header(request_head, "Range")
    return request_head.startswith(b"GET ") and value is not None and not value.startswith("bytes=0-")


class FaultProxy:
    """Listens on 127.0.0.1:port and relays to `upstream` (host, port), injecting queued faults."""

    def __init__(self, upstream: tuple[str, int], stall_seconds: float = 3.0, match: Callable[[bytes], bool] = is_data_range):
        self.upstream = upstream
        self.stall_seconds = stall_seconds
        self.match = match
        self.faults: deque[str] = deque()
        self.injected: list[str] = []
        self.requests = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def inject(self, *faults: str) -> None:
        """Queue faults for the next matching requests, in order."""
        with self._lock:
            self.faults.extend(faults)

    def always(self, fault: str, count: int = 1000) -> None:
        self.inject(*([fault] * count))

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def _next_fault(self, head: bytes) -> str:
        with self._lock:
            self.requests += 1
            if self.faults and self.match(head):
                fault = self.faults.popleft()
                self.injected.append(fault)
                return fault
        return "pass"

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        client_buffer, upstream_buffer = bytearray(), bytearray()
        try:
            while True:
                head = _read_head(client, client_buffer)
                if head is None:
                    return
                length = int(_header(head, "Content-Length") or 0)
                body = _read_exact(client, client_buffer, length)
                fault = self._next_fault(head)
                if fault == "503":
                    message = b"<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>"
                    client.sendall(
                        b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                        + f"Content-Length: {len(message)}\r\n\r\n".encode()
                        + message
                    )
                    continue
                if upstream is None:
                    upstream = socket.create_connection(self.upstream)
                    upstream_buffer.clear()
                upstream.sendall(head + body)
                response_head = _read_head(upstream, upstream_buffer)
                if response_head is None:
                    return
                response_length = int(_header(response_head, "Content-Length") or 0)
                response_body = _read_exact(upstream, upstream_buffer, response_length)
                if (_header(response_head, "Connection") or "").lower() == "close":
                    upstream.close()
                    upstream = None
                if fault == "pass" or len(response_body) < 2:
                    client.sendall(response_head + response_body)
                    continue
                half = len(response_body) // 2
                client.sendall(response_head + response_body[:half])
                if fault == "reset":
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                elif fault == "stall":
                    time.sleep(self.stall_seconds)
                return  # truncate (and the rest): close the connection mid-body
        except OSError:
            return
        finally:
            if upstream is not None:
                upstream.close()
            client.close()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
