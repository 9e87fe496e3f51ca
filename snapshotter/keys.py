"""Validation of snapshot keys and labels, and the namespace a request belongs to.

containerd hands a proxy snapshotter backend keys of the form `<namespace>/<seq>/<client key>`,
so keys contain `/` and a client key may contain more. Keys are never used as paths here
(directories are named by numeric id), but keys that look like path traversal, absolute or
non-canonical paths, or that contain control characters are refused all the same.
"""

from __future__ import annotations

import re

from snapshotter.errors import InvalidArgument

MAX_KEY_BYTES = 4096
MAX_LABEL_BYTES = 4096  # containerd's limit for one label's key plus value
NAMESPACE_HEADER = "containerd-namespace"

_NAMESPACE = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$")  # containerd's identifier rule
_MAX_NAMESPACE = 76
_BACKEND_PREFIX = re.compile(r"^([^/]+)/([0-9]+)/")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def validate_key(key: str, what: str = "key") -> str:
    """Return `key` if it is an acceptable snapshot key, else raise InvalidArgument naming the problem."""
    if not key:
        raise InvalidArgument(f"snapshot {what} is empty")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidArgument(f"snapshot {what} is longer than {MAX_KEY_BYTES} bytes")
    if _CONTROL.search(key):
        raise InvalidArgument(f"snapshot {what} {key!r} contains a control character")
    if key.startswith("/") or key.endswith("/"):
        raise InvalidArgument(f"snapshot {what} {key!r} must not start or end with '/'")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise InvalidArgument(f"snapshot {what} {key!r} has an empty, '.' or '..' path component")
    return key


def validate_labels(labels: dict[str, str]) -> dict[str, str]:
    """Return `labels` if every key plus value fits containerd's 4096-byte limit."""
    for key, value in labels.items():
        size = len(key.encode()) + len(value.encode())
        if size > MAX_LABEL_BYTES:
            raise InvalidArgument(
                f"label {key[:64]!r} is {size} bytes (key plus value); containerd allows at most {MAX_LABEL_BYTES}"
            )
    return labels


def backend_namespace(key: str) -> str | None:
    """The namespace a containerd backend key (`<ns>/<seq>/...`) names, or None."""
    match = _BACKEND_PREFIX.match(key)
    return match.group(1) if match else None


def namespace_for(key: str, header: str | None) -> str:
    """The namespace of a request: the containerd-namespace header, else the key's `<ns>/<seq>/` prefix, else ""."""
    if header:
        if len(header) > _MAX_NAMESPACE or not _NAMESPACE.match(header):
            raise InvalidArgument(f"invalid containerd namespace {header!r}")
        return header
    match = _BACKEND_PREFIX.match(key)
    return match.group(1) if match else ""
