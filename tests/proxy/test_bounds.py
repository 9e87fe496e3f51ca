"""An upstream that never stops sending, or trickles, cannot hold a proxy download forever or fill its
disk: the download is cut at the cache's size (no announced length) or at the fetch deadline, the
client is cut off short of a complete body, and nothing is cached."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from tests.proxy.helpers import cached_files, start_proxy

DIGEST = "sha256:" + "ab" * 32


class MisbehavingUpstream:
    """A registry whose one blob is endless (chunked, no length) or trickles (a length it takes ages to send)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.stop_event = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self.do_GET(body=False)

            def do_GET(self, body: bool = True) -> None:
                if self.path == "/v2/":
                    self.send_response(200)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    if body:
                        self.wfile.write(b"{}")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Docker-Content-Digest", DIGEST)
                if outer.mode == "endless":
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    self.send_header("Content-Length", str(4 << 20))
                self.end_headers()
                if not body:
                    return
                try:
                    while not outer.stop_event.is_set():
                        if outer.mode == "endless":
                            piece = b"x" * (256 << 10)
                            self.wfile.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
                        else:
                            self.wfile.write(b"x" * 1024)
                            self.wfile.flush()
                            time.sleep(0.2)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.stop_event.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("mode", ["endless", "trickle"])
def test_an_endless_or_trickling_blob_is_cut_off_and_not_cached(tmp_path, mode):
    upstream = MisbehavingUpstream(mode)
    proxy = start_proxy(tmp_path, [("bad.example", upstream.url)], "--cache-size", "8M", "--fetch-timeout", "3")
    try:
        started = time.monotonic()
        with _cut_or_error():
            r = requests.get(f"{proxy.url}/v2/app/blobs/{DIGEST}", params={"ns": "bad.example"}, timeout=30)
            assert r.status_code >= 500 or len(r.content) < (100 << 20)
        assert time.monotonic() - started < 20
        deadline = time.monotonic() + 10
        wanted = "without announcing a length" if mode == "endless" else "sent only"
        while wanted not in proxy.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert wanted in proxy.log(), proxy.log()[-2000:]
        assert DIGEST.split(":")[1] not in " ".join(cached_files(proxy))
        assert not [p for p in proxy.cache_dir.rglob("*") if p.is_file() and p.stat().st_size > (8 << 20)]
    finally:
        proxy.stop()
        upstream.close()


class _cut_or_error:
    """A download cut off may reach the client as an error status or as a connection cut short: both are fine."""

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb) -> bool:
        return kind is not None and issubclass(kind, requests.exceptions.RequestException)
