"""A read-only registry endpoint over an OCI layout that sends blobs slowly.

Used to stop a conversion at chosen moments: with blobs arriving at a few MB/s,
every stage (chunks, indexes, records) lasts long enough to be interrupted.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class SlowRegistry:
    def __init__(self, layout: Path, bytes_per_second: int) -> None:
        self.layout = layout
        self.rate = bytes_per_second
        index = json.loads((layout / "index.json").read_text())
        self.tags = {m["annotations"]["org.opencontainers.image.ref.name"]: m for m in index["manifests"]}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                parts = self.path.split("/")
                if self.path == "/v2/":
                    return self._send(200, b"{}", "application/json")
                if len(parts) >= 5 and parts[-2] == "manifests":
                    ref = parts[-1]
                    desc = outer.tags.get(ref) or {"digest": ref, "mediaType": "application/vnd.oci.image.manifest.v1+json"}
                    path = outer.layout / "blobs" / "sha256" / desc["digest"].split(":")[-1]
                    if not path.exists():
                        return self._send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}', "application/json")
                    return self._send(200, path.read_bytes(), desc["mediaType"])
                if len(parts) >= 5 and parts[-2] == "blobs":
                    path = outer.layout / "blobs" / "sha256" / parts[-1].split(":")[-1]
                    if not path.exists():
                        return self._send(404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}', "application/json")
                    return self._send(200, path.read_bytes(), "application/octet-stream", slow=True)
                return self._send(404, b"", "text/plain")

            def _send(self, status: int, body: bytes, content_type: str, slow: bool = False) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                step = max(1, outer.rate // 20)
                try:
                    for i in range(0, len(body), step if slow else len(body) or 1):
                        self.wfile.write(body[i : i + (step if slow else len(body))])
                        if slow:
                            time.sleep(0.05)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
