"""Sending blob bodies: byte ranges, conditional requests, and zero-copy sendfile from cached or in-flight files."""

from __future__ import annotations

import asyncio
import os
import re
from typing import BinaryIO

from aiohttp import web

from registry_proxy.errors import ProxyError

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def blob_headers(digest: str) -> dict[str, str]:
    return {
        "Docker-Content-Digest": digest,
        "ETag": f'"{digest}"',
        "Content-Type": "application/octet-stream",
        "Accept-Ranges": "bytes",
        "Cache-Control": "max-age=31536000",
    }


def not_modified(request: web.Request, digest: str) -> bool:
    """Whether If-None-Match names this digest's ETag (or *)."""
    header = request.headers.get("If-None-Match")
    if not header:
        return False
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or f'"{digest}"' in tags


def parse_range(header: str | None, size: int) -> tuple[int, int, bool]:
    """(start, length, partial) for a Range header on a `size`-byte body; a single range is honoured,
    anything else is ignored (the whole body, as RFC 9110 allows); 416 when it starts past the end."""
    if not header:
        return 0, size, False
    match = _RANGE.match(header.strip().replace(" ", ""))
    if not match or not (match.group(1) or match.group(2)):
        return 0, size, False
    first, last = match.group(1), match.group(2)
    if first:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
        if last and int(last) < start:
            return 0, size, False
    else:
        start, end = max(0, size - int(last)), size - 1
    if start >= size:
        raise ProxyError(
            416,
            "RANGE_INVALID",
            f"range {header!r} starts past the end of the {size}-byte blob",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return start, end - start + 1, True


async def start_body(
    request: web.Request, headers: dict[str, str], size: int, start: int, length: int, partial: bool
) -> web.StreamResponse:
    """Send the status line and headers of a (possibly partial) blob response."""
    response = web.StreamResponse(status=206 if partial else 200, headers=headers)
    if partial:
        response.headers["Content-Range"] = f"bytes {start}-{start + length - 1}/{size}"
    response.content_length = length
    await response.prepare(request)
    return response


async def send_file(request: web.Request, response: web.StreamResponse, stream: BinaryIO, offset: int, count: int) -> None:
    """`count` bytes of `stream` from `offset` to the client: sendfile(2), or reads and writes where it is unavailable."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client went away")
    loop = asyncio.get_running_loop()
    try:
        await loop.sendfile(transport, stream, offset, count, fallback=False)
        return
    except (NotImplementedError, asyncio.SendfileNotAvailableError):
        pass
    fd = stream.fileno()
    while count > 0:
        data = os.pread(fd, min(count, 1 << 20), offset)
        if not data:
            raise ConnectionResetError("the file ended early")
        await response.write(data)
        offset += len(data)
        count -= len(data)
