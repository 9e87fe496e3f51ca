"""Validation of snapshot keys and labels, and the namespace a request belongs to.

containerd hands a proxy snapshotter backend keys of the form `<namespace>/<seq>/<client key>`,
and a client key may be anything containerd itself accepts: absolute paths (containerd's own
conformance suite uses them, arriving as `<ns>/<seq>//tmp/...`), `..`, spaces, control
characters. Keys are never used as paths here (directories are named by numeric id), so the only
limits are containerd's own: a key must not be empty (its bolt store refuses empty bucket names)
and a label's key plus value must fit 4096 bytes. A key's size is bounded by the 16 MiB gRPC
message limit.
"""

from __future__ import annotations

import re

from snapshotter.errors import InvalidArgument

MAX_LABEL_BYTES = 4096  # containerd's limit for one label's key plus value
NAMESPACE_HEADER = "containerd-namespace"

_NAMESPACE = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$")  # containerd's identifier rule
_MAX_NAMESPACE = 76
_BACKEND_PREFIX = re.compile(r"^([^/]+)/([0-9]+)/")


def validate_key(key: str, what: str = "key") -> str:
    """Return `key` if containerd would accept it (any non-empty string), else raise InvalidArgument."""
    if not key:
        raise InvalidArgument(f"snapshot {what} is empty")
    return key


def validate_labels(labels: dict[str, str]) -> dict[str, str]:
    """Return `labels` if every key plus value fits containerd's 4096-byte limit and no set label has an empty key.

    A label with an empty value is no label (it is dropped, as containerd drops it); one with an
    empty key and a value containerd cannot store (its bolt store refuses empty keys).
    """
    for key, value in labels.items():
        if not key and value:
            raise InvalidArgument(f"label with value {value[:64]!r} has an empty key; label keys must not be empty")
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
