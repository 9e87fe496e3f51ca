"""Errors in the OCI distribution API's shape: an HTTP status, an error code, a message naming the fix."""

from __future__ import annotations

import json


class ProxyError(Exception):
    """An error to answer with `{"errors": [{"code", "message", "detail"}]}` and `status`."""

    def __init__(
        self, status: int, code: str, message: str, detail: object = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> bytes:
        error: dict = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return json.dumps({"errors": [error]}).encode()

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


def unknown(kind: str, what: str, detail: object = None) -> ProxyError:
    """404 for a manifest, blob or repository the upstream does not have."""
    code = {"manifest": "MANIFEST_UNKNOWN", "blob": "BLOB_UNKNOWN"}.get(kind, "NAME_UNKNOWN")
    return ProxyError(404, code, f"{what} is not known upstream", detail)


def bad_gateway(message: str, code: str = "UNKNOWN", detail: object = None) -> ProxyError:
    """502: the upstream failed or sent something the proxy will not pass on."""
    return ProxyError(502, code, message, detail)


def gateway_timeout(message: str) -> ProxyError:
    return ProxyError(504, "UNKNOWN", message)


def denied(message: str) -> ProxyError:
    return ProxyError(403, "DENIED", message)


def unsupported(message: str, status: int = 405) -> ProxyError:
    headers = {"Allow": "GET, HEAD"} if status == 405 else None
    return ProxyError(status, "UNSUPPORTED", message, headers=headers)


def name_invalid(message: str) -> ProxyError:
    return ProxyError(400, "NAME_INVALID", message)


class StreamBroken(Exception):
    """A response whose headers were sent cannot carry an error: the connection is cut instead."""
