"""An ImageSource (converter.image's input) that reads an image through the proxy itself.

A conversion child process uses it: manifests and blobs come from the proxy's cache, or join the
single-flight download a client's pull started, so converting costs no second upstream fetch.
Requests carry the proxy's internal token, so they use the proxy's own upstream credentials and do
not queue conversions themselves.
"""

from __future__ import annotations

import hashlib
from typing import BinaryIO

import requests

from layerstore.errors import ImageError, RegistryError
from layerstore.oci import mediatypes

TOKEN_HEADER = "X-Liftoff-Proxy-Token"
TOKEN_ENV = "LIFTOFF_PROXY_TOKEN"


class ProxyImageSource:
    """The image `digest` of `repository` on upstream `upstream`, through the proxy at `proxy_url`."""

    def __init__(
        self, proxy_url: str, upstream: str, repository: str, digest: str, tag: str | None, token: str, timeout: float = 300.0
    ) -> None:
        self.base = proxy_url.rstrip("/")
        self.upstream = upstream
        self.repository = repository
        self.digest = digest
        self.name = f"{upstream}/{repository}@{digest}"
        self.reference = f"{upstream}/{repository}:{tag}" if tag else None
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers.update({TOKEN_HEADER: token, "User-Agent": "liftoff-proxy-converter"})

    def _get(self, kind: str, digest: str, stream: bool) -> requests.Response:
        url = f"{self.base}/v2/{self.repository}/{kind}/{digest}"
        headers = {"Accept": mediatypes.ACCEPT} if kind == "manifests" else {}
        try:
            response = self.session.get(url, params={"ns": self.upstream}, headers=headers, stream=stream, timeout=self.timeout)
        except requests.RequestException as e:
            raise RegistryError(f"the proxy at {self.base} is unreachable: {e}") from None
        if response.status_code != 200:
            try:
                message = response.json()["errors"][0]["message"]
            except (ValueError, KeyError, IndexError, TypeError):
                message = response.text[:200]
            response.close()
            raise RegistryError(f"{kind[:-1]} {digest} of {self.upstream}/{self.repository}: {response.status_code} {message}")
        return response

    def manifest(self, digest: str) -> tuple[str, bytes]:
        response = self._get("manifests", digest, stream=False)
        body = response.content
        if len(body) > mediatypes.MAX_MANIFEST_BYTES or "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            raise ImageError(f"{self.name}: manifest {digest} from the proxy does not match its digest")
        return response.headers.get("Content-Type", "").split(";")[0].strip(), body

    def resolve(self) -> tuple[str, bytes, str]:
        media_type, body = self.manifest(self.digest)
        return media_type, body, self.digest

    def open_blob(self, digest: str) -> BinaryIO:
        response = self._get("blobs", digest, stream=True)
        response.raw.decode_content = False
        length = response.headers.get("Content-Length")
        return _CheckedStream(response, int(length) if length and length.isdigit() else None, f"blob {digest}")  # type: ignore[return-value]

    def close(self) -> None:
        self.session.close()


class _CheckedStream:
    """A blob body that raises RegistryError (retried) when the connection breaks or ends short, so a network
    fault is never mistaken for a malformed image (ImageError, not retried)."""

    def __init__(self, response: requests.Response, length: int | None, what: str) -> None:
        self.response = response
        self.length = length
        self.what = what
        self.received = 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.response.raw.read(n if n is not None and n >= 0 else None)
        except Exception as e:  # urllib3's ProtocolError and friends
            raise RegistryError(
                f"{self.what}: the proxy's stream broke after {self.received} bytes ({type(e).__name__})"
            ) from None
        self.received += len(data)
        if not data and n != 0 and self.length is not None and self.received < self.length:
            raise RegistryError(f"{self.what}: the proxy's stream ended after {self.received} of {self.length} bytes")
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.response.close()

    def __enter__(self) -> _CheckedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
