"""Stores by URL: file:///path and s3://bucket/prefix."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from layerstore.errors import StoreError
from layerstore.stores.base import Store
from layerstore.stores.chain import StoreChain
from layerstore.stores.file import FileStore

__all__ = ["FileStore", "Store", "StoreChain", "open_store", "open_stores"]


def open_store(
    url: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    path_style: bool | None = None,
) -> Store:
    """Open a store from its URL.

    file:///abs/path (or a plain path) is a directory. s3://bucket/prefix uses the
    standard AWS configuration; the keyword arguments, or the URL's query
    (?endpoint_url=...&region=...&path_style=true), override endpoint and region.
    """
    parts = urlsplit(url)
    if parts.scheme in ("", "file"):
        if parts.scheme == "file" and parts.netloc not in ("", "localhost"):
            raise StoreError(f"store URL {url!r}: file URLs need an absolute path (file:///path)")
        path = parts.path if parts.scheme == "file" else url
        if not path:
            raise StoreError(f"store URL {url!r} has no path")
        return FileStore(os.path.abspath(path))
    if parts.scheme == "s3":
        from layerstore import s3url
        from layerstore.stores.s3 import S3Store

        return S3Store(s3url.parse(url, endpoint_url=endpoint_url, region=region, path_style=path_style))
    raise StoreError(f"unsupported store URL {url!r}: use file:///path or s3://bucket/prefix")


def open_stores(urls: list[str], **options: object) -> list[Store]:
    """open_store() for each URL, in the given (priority) order."""
    if not urls:
        raise StoreError("no store given: pass --store URL (file:///path or s3://bucket/prefix)")
    return [open_store(url, **options) for url in urls]  # type: ignore[arg-type]
