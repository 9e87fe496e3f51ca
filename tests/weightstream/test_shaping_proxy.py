"""benchmarks/shaping_proxy.py: the latency and bandwidth caps it promises (it is reused by other benchmarks)."""

from __future__ import annotations

import http.client
import http.server
import threading
import time

import pytest

from benchmarks.shaping_proxy import ProxyProcess, Shaping, ShapingProxy

BODY = b"x" * (8 << 20)


@pytest.fixture(scope="module")
def origin():
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = BODY if self.path == "/big" else b"ok"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address
    server.shutdown()
    server.server_close()


def _get(port: int, path: str, conn: http.client.HTTPConnection | None = None) -> tuple[float, int]:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    started = time.perf_counter()
    conn.request("GET", path)
    body = conn.getresponse().read()
    if own:
        conn.close()
    return time.perf_counter() - started, len(body)


def test_latency_is_added_per_request_on_a_kept_alive_connection(origin):
    with ShapingProxy(origin, Shaping(latency=0.05)) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
        times = [_get(proxy.port, "/small", conn)[0] for _ in range(3)]
        conn.close()
    assert all(0.05 <= t < 0.5 for t in times), times


def test_per_connection_and_total_caps(origin):
    with ShapingProxy(origin, Shaping(conn_rate=40e6)) as proxy:
        seconds, size = _get(proxy.port, "/big")
    assert size == len(BODY) and seconds >= 0.15  # 8.4 MB at 40 MB/s: ~0.2 s (minus the burst allowance)
    with ShapingProxy(origin, Shaping(total_rate=40e6)) as proxy:
        results = []
        threads = [threading.Thread(target=lambda: results.append(_get(proxy.port, "/big"))) for _ in range(3)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
    assert len(results) == 3 and elapsed >= 0.5  # 25 MB shared at 40 MB/s: ~0.63 s


def test_as_a_child_process(origin):
    with ProxyProcess(origin, Shaping(latency=0.03)) as proxy:
        seconds, size = _get(proxy.port, "/small")
    assert size == 2 and seconds >= 0.03
    assert proxy.process.poll() is not None
