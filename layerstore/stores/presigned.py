"""Whole-object GETs through presigned URLs on keep-alive `http.client` connections, one per thread.

botocore's get_object costs ~0.9 ms of CPU per request; signing a URL with botocore and sending it with the
standard library costs ~0.37 ms (benchmarks/RESULTS.md, "Cold start at the seeds' scale, third session"). A start
of the vLLM image fetches hundreds of chunks on two cores shared with the container it starts.

Failures are raised as the botocore exceptions get_object would raise for them (a ClientError with S3's error
code and HTTP status; connection, timeout and truncation errors), so `layerstore.s3url.call` retries and explains
them exactly as it does for botocore's own calls. Where this path cannot stand in for botocore (a proxy applies to
the endpoint, botocore cannot sign, or S3 answers with a redirect or a 400, as it does for a bucket in another
region than the client's, which botocore's get_object follows), `PresignedGetter.usable` is False or `UseBotocore`
is raised, and the store uses get_object.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import ssl
import threading
import urllib.request
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import botocore.exceptions as bex

if TYPE_CHECKING:
    from botocore.client import BaseClient

EXPIRES = 900  # seconds a presigned URL stays valid; each is used at once, once
_CODE = re.compile(rb"<Code>([^<]{1,128})</Code>")
_MESSAGE = re.compile(rb"<Message>([^<]{0,512})</Message>")
ERROR_BODY_LIMIT = 64 << 10  # bytes of an error answer read to find S3's error code
BOTOCORE_STATUSES = frozenset({301, 302, 307, 308, 400})  # answers botocore's get_object handles (region redirects)


class UseBotocore(Exception):
    """The endpoint answered in a way only botocore's get_object follows: ask it instead."""


class PresignedGetter:
    """GETs objects of one bucket by key with `client`'s endpoint, credentials and addressing style."""

    def __init__(self, client: BaseClient, bucket: str, timeout: float) -> None:
        self.client = client
        self.bucket = bucket
        self.timeout = timeout
        self.endpoint = client.meta.endpoint_url
        self._local = threading.local()
        self._open: set[http.client.HTTPConnection] = set()  # every thread's, for close()
        self._lock = threading.Lock()
        self._ssl: ssl.SSLContext | None = None
        self.usable = self._probe()

    def _probe(self) -> bool:
        """Whether a presigned URL can be made here and reaches the endpoint directly (no proxy)."""
        try:
            url = self._presign("probe")
        except Exception:  # no credentials, a signer botocore cannot presign with: botocore's own path
            return False
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            return False
        if parts.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(parts.hostname or ""):
            return False
        if parts.scheme == "https":
            self._ssl = ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE") or None)
        return True

    def _presign(self, key: str) -> str:
        return self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=EXPIRES)

    def get(self, key: str) -> bytes:
        """The object's bytes; botocore's exceptions on failure (see the module docstring)."""
        parts = urlsplit(self._presign(key))
        target = f"{parts.path}?{parts.query}" if parts.query else parts.path
        conn, reused = self._connection(parts.scheme, parts.netloc)
        try:
            try:
                return self._request(conn, target, key)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                if not reused:
                    raise
                self._drop()  # a kept-alive connection the server had closed: once more on a new one
                conn, _ = self._connection(parts.scheme, parts.netloc)
                return self._request(conn, target, key)
        except (bex.ClientError, UseBotocore):
            raise
        except Exception as error:
            connected = conn.sock is not None
            self._drop()
            raise self._translate(error, connected) from None

    def _request(self, conn: http.client.HTTPConnection, target: str, key: str) -> bytes:
        conn.putrequest("GET", target, skip_accept_encoding=True)
        conn.endheaders()
        response = conn.getresponse()
        if response.status == 200:
            return response.read()
        body = response.read(ERROR_BODY_LIMIT)
        if not response.isclosed():  # an error answer too long to keep the connection for
            self._drop()
        if response.status in BOTOCORE_STATUSES:
            raise UseBotocore(f"HTTP {response.status}")
        raise _client_error(response.status, response.reason, body, key)

    def _connection(self, scheme: str, netloc: str) -> tuple[http.client.HTTPConnection, bool]:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.where == (scheme, netloc):
            return conn, True
        self._drop()
        if scheme == "https":
            conn = http.client.HTTPSConnection(netloc, timeout=self.timeout, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(netloc, timeout=self.timeout)
        self._local.conn, self._local.where = conn, (scheme, netloc)
        with self._lock:
            self._open.add(conn)
        return conn, False

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()
            with self._lock:
                self._open.discard(conn)

    def close(self) -> None:
        """Close every thread's connection."""
        with self._lock:
            conns, self._open = self._open, set()
        for conn in conns:
            conn.close()

    def _translate(self, error: Exception, connected: bool) -> Exception:
        """The botocore exception get_object raises for the same failure."""
        if isinstance(error, ssl.SSLError):  # a certificate botocore would refuse too: not retried
            return bex.SSLError(endpoint_url=self.endpoint, error=error)
        if isinstance(error, TimeoutError):
            kind = bex.ReadTimeoutError if connected else bex.ConnectTimeoutError
            return kind(endpoint_url=self.endpoint, error=error)
        if isinstance(error, http.client.IncompleteRead):
            return bex.ResponseStreamingError(error=error)
        if isinstance(error, ConnectionRefusedError | socket.gaierror):
            return bex.EndpointConnectionError(endpoint_url=self.endpoint, error=error)
        if isinstance(error, OSError | http.client.HTTPException):
            return bex.ConnectionClosedError(endpoint_url=self.endpoint, error=error)
        return error


def _client_error(status: int, reason: str, body: bytes, key: str) -> bex.ClientError:
    """A botocore ClientError like get_object's: S3's error code from the XML body, else the status."""
    code = _CODE.search(body)
    message = _MESSAGE.search(body)
    error = {
        "Code": code.group(1).decode(errors="replace") if code else str(status),
        "Message": message.group(1).decode(errors="replace") if message else reason,
        "Key": key,
    }
    return bex.ClientError({"Error": error, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
