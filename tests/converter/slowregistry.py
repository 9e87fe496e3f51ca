"""Registry endpoints on loopback that misbehave on purpose.

SlowRegistry serves an OCI layout with blobs arriving at a few MB/s, to stop a
conversion at chosen moments: every stage (chunks, indexes, records) lasts long
enough to be interrupted. HostileRegistry serves one image whose chosen
manifests and blobs never end, trickle, or redirect somewhere else.
"""

from __future__ import annotations

import hashlib
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


ENDLESS_LENGTH = 10 << 30  # what an "endless" blob announces: 10 GiB


class HostileRegistry:
    """A registry endpoint serving one image, where chosen manifests and blobs misbehave.

    `behaviour[key]` (key: a tag or a digest) is one of
    - "endless":  the real bytes, then zeros without end (announcing ENDLESS_LENGTH bytes)
    - "trickle":  one byte every `trickle_gap` seconds, announcing ten times the real length
    - "redirect:URL": a 307 to URL
    `sent[key]` counts the body bytes written for each key.
    """

    def __init__(self, trickle_gap: float = 0.05) -> None:
        self.manifests: dict[str, tuple[str, bytes]] = {}  # tag or digest -> (media type, body)
        self.blobs: dict[str, bytes] = {}
        self.behaviour: dict[str, str] = {}
        self.sent: dict[str, int] = {}
        self.gap = trickle_gap
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                parts = self.path.split("?")[0].split("/")
                if len(parts) < 5 or parts[-2] not in ("manifests", "blobs"):
                    return self._plain(404, b"{}")
                key = parts[-1]
                found = (outer.manifests.get(key) if parts[-2] == "manifests" else None) or (
                    ("application/octet-stream", outer.blobs[key]) if key in outer.blobs else None
                )
                if found is None:
                    return self._plain(404, b'{"errors":[{"code":"NOT_FOUND"}]}')
                content_type, body = found
                mode = outer.behaviour.get(key, "")
                if mode.startswith("redirect:"):
                    self.send_response(307)
                    self.send_header("Location", mode[len("redirect:") :])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                length = {"endless": ENDLESS_LENGTH, "trickle": 10 * len(body)}.get(mode, len(body))
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                try:
                    if mode == "trickle":
                        for i in range(length):
                            self._write(key, body[i : i + 1] or b"\0")
                            time.sleep(outer.gap)
                        return
                    self._write(key, body)
                    zeros = bytes(1 << 16)
                    while mode == "endless":
                        self._write(key, zeros)
                except OSError:  # the client gave up: what the test expects
                    pass

            def _write(self, key: str, data: bytes) -> None:
                self.wfile.write(data)
                self.wfile.flush()
                outer.sent[key] = outer.sent.get(key, 0) + len(data)

            def _plain(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def add_image(self, tag: str, layers: list[tuple[bytes, str, str]], *, sizes: dict[int, int] | None = None) -> dict:
        """Serve an image of `layers` ((blob, media type, diff_id)) as `tag`; `sizes` overrides descriptor sizes
        by layer number. Returns {"manifest", "config", "layers"}: the digests."""
        config = json.dumps(
            {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [d for _, _, d in layers]}}
        ).encode()
        descriptors = []
        for i, (blob, media_type, _) in enumerate(layers):
            digest = _sha(blob)
            self.blobs[digest] = blob
            descriptors.append({"mediaType": media_type, "digest": digest, "size": (sizes or {}).get(i, len(blob))})
        self.blobs[_sha(config)] = config
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": _sha(config), "size": len(config)},
                "layers": descriptors,
            }
        ).encode()
        entry = ("application/vnd.oci.image.manifest.v1+json", manifest)
        self.manifests[tag] = self.manifests[_sha(manifest)] = entry
        return {"manifest": _sha(manifest), "config": _sha(config), "layers": [d["digest"] for d in descriptors]}

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
