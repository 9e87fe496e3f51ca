"""Digest strings ("sha256:<64 hex>") and OCI chain IDs."""

from __future__ import annotations

import hashlib
import re

from layerstore.errors import ImageError

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def check_digest(digest: str, what: str = "digest") -> str:
    """Return `digest` if it is a well-formed sha256 digest, else raise ImageError."""
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise ImageError(f"invalid {what} {digest!r}: expected 'sha256:' and 64 lowercase hex digits")
    return digest


def hex_of(digest: str) -> str:
    """The 64 hex digits of a sha256 digest string."""
    return check_digest(digest)[len("sha256:") :]


def sha256_digest(data: bytes | bytearray | memoryview) -> str:
    """The digest string of `data`."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI chain IDs: ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    chains: list[str] = []
    for diff_id in diff_ids:
        check_digest(diff_id, "diff_id")
        if not chains:
            chains.append(diff_id)
        else:
            chains.append(sha256_digest(f"{chains[-1]} {diff_id}".encode()))
    return chains
