"""A real HTTP relay in front of a real server that injects the faults a network produces.

Each client connection gets its own upstream connection; requests are relayed one at a
time. A request that matches (`match(request_head)`, default: every request) takes the
next queued fault:

- "pass":       relayed untouched
- "503", "500", "404", "401": answered by the relay itself with that status (the server never sees it)
- "delay":      relayed after `delay_seconds`
- "reset":      half the body, then the connection is reset (RST)
- "truncate":   the full Content-Length announced, half the body sent, then a clean close (FIN)
- "stall":      half the body, then silence for `stall_seconds`, then close
- "corrupt":    the whole body, with bytes flipped in the middle
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
import time
from collections import deque
from collections.abc import Callable

STATUS = {
    "503": (b"503 Slow Down", b"<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>"),
    "500": (b"500 Internal Server Error", b"<Error><Code>InternalError</Code><Message>fault injected</Message></Error>"),
    "404": (b"404 Not Found", b"<Error><Code>NoSuchKey</Code><Message>fault injected</Message></Error>"),
    "401": (b"401 Unauthorized", b'{"errors":[{"code":"UNAUTHORIZED","message":"fault injected"}]}'),
}


def read_head(sock: socket.socket, buffer: bytearray) -> bytes | None:
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


def header(head: bytes, name: str) -> str | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.lower().encode():
            return value.strip().decode()
    return None


def read_exact(sock: socket.socket, buffer: bytearray, n: int) -> bytes:
    while len(buffer) < n:
        data = sock.recv(1 << 20)
        if not data:
            break
        buffer += data
    body = bytes(buffer[:n])
    del buffer[:n]
    return body


def any_request(_head: bytes) -> bool:
    return True


class FaultProxy:
    """Listens on 127.0.0.1:port and relays to `upstream` (host, port), injecting queued faults."""

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        match: Callable[[bytes], bool] = any_request,
        stall_seconds: float = 3.0,
        delay_seconds: float = 1.0,
    ) -> None:
        self.upstream = upstream
        self.match = match
        self.stall_seconds = stall_seconds
        self.delay_seconds = delay_seconds
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
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def inject(self, *faults: str) -> None:
        """Queue faults for the next matching requests, in order."""
        with self._lock:
            self.faults.extend(faults)

    def always(self, fault: str, count: int = 100_000) -> None:
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
                head = read_head(client, client_buffer)
                if head is None:
                    return
                body = read_exact(client, client_buffer, int(header(head, "Content-Length") or 0))
                fault = self._next_fault(head)
                if fault in STATUS:
                    status, message = STATUS[fault]
                    payload = b"" if head.startswith(b"HEAD ") else message  # a HEAD answer carries headers only
                    client.sendall(
                        b"HTTP/1.1 "
                        + status
                        + b"\r\nContent-Type: application/xml\r\n"
                        + f"Content-Length: {len(message)}\r\n\r\n".encode()
                        + payload
                    )
                    continue
                if fault == "delay":
                    time.sleep(self.delay_seconds)
                if upstream is None:
                    upstream = socket.create_connection(self.upstream)
                    upstream_buffer.clear()
                upstream.sendall(head + body)
                response_head = read_head(upstream, upstream_buffer)
                if response_head is None:
                    return
                response_body = b""
                if not head.startswith(b"HEAD "):
                    response_body = read_exact(upstream, upstream_buffer, int(header(response_head, "Content-Length") or 0))
                if (header(response_head, "Connection") or "").lower() == "close":
                    upstream.close()
                    upstream = None
                if fault == "corrupt" and len(response_body) >= 2:
                    middle = len(response_body) // 2
                    response_body = (
                        response_body[:middle]
                        + bytes(b ^ 0xFF for b in response_body[middle : middle + 8])
                        + response_body[middle + 8 :]
                    )
                if fault in ("pass", "delay", "corrupt") or len(response_body) < 2:
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
