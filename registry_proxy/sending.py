"""Sending blob bodies: byte ranges, conditional requests, and zero-copy sendfile from cached or in-flight files."""

from __future__ import annotations

import asyncio
import os
import re
import select
import time
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

from aiohttp import web

from registry_proxy.errors import ProxyError

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
SEND_SLICE = 16 << 20  # bytes per trip to a sending thread
POLL_MS = 100  # how long a sending thread waits on a full socket before handing back
CLIENT_STALL_SECONDS = 300.0
_POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="sendfile")


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
    """`count` bytes of `stream` from `offset` to the client with sendfile(2) on a thread of the pool, so the
    kernel's copying runs on every core, not only the event loop's; reads and writes where sendfile is not
    available (TLS)."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client went away")
    sock = transport.get_extra_info("socket")
    if sock is None or transport.get_extra_info("sslcontext") is not None:
        await _copy(response, stream, offset, count)
        return
    while transport.get_write_buffer_size():  # the headers must be on the wire before our bytes
        await asyncio.sleep(0.001)
    loop = asyncio.get_running_loop()
    sock_fd, file_fd = sock.fileno(), stream.fileno()
    idle_since = time.monotonic()
    while count > 0:
        if transport.is_closing():
            raise ConnectionResetError("the client went away")
        sent = await loop.run_in_executor(_POOL, _sendfile_some, sock_fd, file_fd, offset, count)
        if sent:
            offset, count, idle_since = offset + sent, count - sent, time.monotonic()
        elif time.monotonic() - idle_since > CLIENT_STALL_SECONDS:
            raise ConnectionResetError(f"the client read nothing for {CLIENT_STALL_SECONDS:.0f} s")


def _sendfile_some(sock_fd: int, file_fd: int, offset: int, count: int) -> int:
    """Send up to SEND_SLICE bytes; returns early (possibly 0) when the socket stays full for POLL_MS."""
    sent = 0
    poller = select.poll()
    poller.register(sock_fd, select.POLLOUT)
    while sent < min(count, SEND_SLICE):
        try:
            n = os.sendfile(sock_fd, file_fd, offset + sent, min(count, SEND_SLICE) - sent)
        except BlockingIOError:
            if not poller.poll(POLL_MS):
                break
            continue
        if n == 0:
            raise ConnectionResetError("the file ended before the announced length")
        sent += n
    return sent


async def _copy(response: web.StreamResponse, stream: BinaryIO, offset: int, count: int) -> None:
    fd = stream.fileno()
    while count > 0:
        data = os.pread(fd, min(count, 1 << 20), offset)
        if not data:
            raise ConnectionResetError("the file ended before the announced length")
        await response.write(data)
        offset += len(data)
        count -= len(data)
