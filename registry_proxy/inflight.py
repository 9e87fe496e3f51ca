"""Single-flight blob downloads: one upstream fetch per digest, any number of clients streaming it as it arrives.

Misses are shared as hits are: clients of the download's repository (and credentials) that join it get
its outcome, the upstream's 404 included, without asking the upstream themselves; other upstream
questions (is this cached blob in that repository? how large is it?) go through SharedCalls, one
request per question however many clients ask it at once.

A download writes the upstream body into a temp file (pwrite at known offsets) while hashing it; readers
open their own descriptor of that file (/proc/self/fd, so a rename or unlink does not matter) and send
what has arrived. The last byte is held back until the digest is verified, so no client ever receives a
complete body that does not match its digest; a failed download cuts every reader off and leaves nothing
in the cache. A verified file is fsynced and renamed into the cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, TypeVar

import aiohttp

from layerstore.oci.bounded import fetch_deadline
from layerstore.units import format_size
from registry_proxy.auth import identity_of
from registry_proxy.blobcache import BlobCache
from registry_proxy.errors import ProxyError, bad_gateway, gateway_timeout
from registry_proxy.metrics import ProxyMetrics
from registry_proxy.upstream import UpstreamClient

log = logging.getLogger(__name__)

CHUNK = 1 << 20
T = TypeVar("T")


def fresh(error: ProxyError) -> ProxyError:
    """A copy of a shared error, so that each client's raise carries its own traceback."""
    return ProxyError(error.status, error.code, error.message, error.detail, dict(error.headers))


class SharedCalls:
    """Concurrent awaits of one key share one call: the first starts it (as a task of its own, so a client
    that goes away cancels nothing), every caller gets its result or a copy of its ProxyError."""

    def __init__(self) -> None:
        self._calls: dict[Hashable, asyncio.Task] = {}

    def __len__(self) -> int:
        return len(self._calls)

    async def run(self, key: Hashable, call: Callable[[], Awaitable[T]]) -> T:
        task = self._calls.get(key)
        if task is None:
            task = asyncio.ensure_future(call())
            self._calls[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        try:
            return await asyncio.shield(task)
        except ProxyError as e:
            raise fresh(e) from None

    def _finished(self, key: Hashable, task: asyncio.Task) -> None:
        if self._calls.get(key) is task:
            del self._calls[key]
        if not task.cancelled():
            task.exception()  # retrieved: every caller may have gone away


class Download:
    """One blob on its way from upstream into a temp file, fetched with `identity`'s credentials."""

    def __init__(self, digest: str, upstream: str, repository: str, fd: int, temp: Path, identity: str = "") -> None:
        self.digest = digest
        self.upstream = upstream
        self.repository = repository
        self.identity = identity
        self.fd = fd
        self.temp = temp
        self.total: int | None = None  # the upstream's Content-Length, once its headers arrived
        self.started = False
        self.written = 0
        self.verified = False
        self.error: ProxyError | None = None
        self.readers = 0
        self._finished = False
        self._waiters: list[asyncio.Future] = []

    # Progress, from the download task

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def start(self, total: int | None) -> None:
        self.total, self.started = total, True
        self._notify()

    def progress(self, n: int) -> None:
        self.written += n
        self._notify()

    def verify(self) -> None:
        self.verified = True
        self._notify()

    def fail(self, error: ProxyError) -> None:
        if not self.verified and self.error is None:
            self.error = error
            self._notify()

    def finish(self) -> None:
        """The task is done with the file: close its descriptor (readers hold their own)."""
        self._finished = True
        os.close(self.fd)

    # Following, from the readers

    async def _wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    async def wait_started(self) -> None:
        """Until the upstream's headers arrived; raises the download's error if it failed first."""
        while not self.started and self.error is None:
            await self._wait()
        if self.error is not None and not self.started:
            raise fresh(self.error)

    def available(self) -> int:
        """Bytes a reader may send: everything once verified, else all but the last byte received."""
        return self.written if self.verified else max(0, self.written - 1)

    async def wait_beyond(self, position: int) -> int:
        """Until more than `position` bytes may be sent (or the blob is complete); the new limit."""
        while True:
            if self.error is not None:
                raise fresh(self.error)
            limit = self.available()
            if limit > position or self.verified:
                return limit
            await self._wait()

    async def wait_verified(self) -> None:
        while not self.verified:
            if self.error is not None:
                raise fresh(self.error)
            await self._wait()

    def open_reader(self) -> BinaryIO:
        """A descriptor of our own on the temp file (valid after rename or unlink)."""
        assert not self._finished
        stream = open(f"/proc/self/fd/{self.fd}", "rb", buffering=0)  # noqa: SIM115 - closed by close_reader
        self.readers += 1
        return stream

    def close_reader(self, stream: BinaryIO) -> None:
        stream.close()
        self.readers -= 1


class BlobFetcher:
    """Starts or joins downloads; `on_fetched(upstream, repository, digest)` records who may read a blob."""

    def __init__(
        self,
        cache: BlobCache,
        metrics: ProxyMetrics,
        on_fetched: Callable[[str, str, str], None],
        fetch_timeout: float | None = None,
    ) -> None:
        """`fetch_timeout`: seconds any one download may take (default: scaled from its size)."""
        self.fetch_timeout = fetch_timeout
        self.cache = cache
        self.metrics = metrics
        self.on_fetched = on_fetched
        self.active: dict[str, Download] = {}
        self._tasks: set[asyncio.Task] = set()
        self._io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="blob-io")

    def joinable(self, client: UpstreamClient, repository: str, digest: str, client_auth: str | None) -> bool:
        """Whether a download of `digest` is in flight for this upstream, repository and credentials: its
        outcome (bytes or the upstream's error) answers this client too, with no question upstream."""
        found = self.active.get(digest)
        return found is not None and (found.upstream, found.repository, found.identity) == (
            client.name,
            repository,
            identity_of(client_auth),
        )

    def fetch(
        self, client: UpstreamClient, repository: str, digest: str, client_auth: str | None
    ) -> tuple[Download, BinaryIO, bool]:
        """Join the download of `digest` in flight, else start one: (download, a reader the caller must close
        with download.close_reader, whether it was joined). No await: the download cannot finish in between."""
        found = self.active.get(digest)
        if found is not None:
            return found, found.open_reader(), True
        fd, temp = self.cache.new_temp()
        download = Download(digest, client.name, repository, fd, temp, identity_of(client_auth))
        self.active[digest] = download
        reader = download.open_reader()
        task = asyncio.create_task(self._run(download, client, client_auth), name=f"fetch {digest}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return download, reader, False

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._io.shutdown(wait=True)

    async def _run(self, download: Download, client: UpstreamClient, client_auth: str | None) -> None:
        digest, repository = download.digest, download.repository
        what = f"blob {digest} of {repository}"
        kept = False
        try:
            response = await client.send(
                "GET", f"/v2/{repository}/blobs/{digest}", repository, "blob", what, client_auth=client_auth
            )
            self.on_fetched(client.name, repository, digest)
            try:
                kept = await self._receive(download, client, response, what)
            finally:
                response.release()
        except ProxyError as e:
            download.fail(e)
        except TimeoutError:
            self.metrics.upstream_errors.labels(client.name, "stalled").inc()
            download.fail(gateway_timeout(f"upstream {client.name} stalled sending {what}: nothing for {client.timeout:.0f} s"))
        except aiohttp.ClientError as e:
            self.metrics.upstream_errors.labels(client.name, "broken").inc()
            got = (
                f"after {download.written} of {download.total} bytes"
                if download.total is not None
                else f"after {download.written} bytes"
            )
            download.fail(bad_gateway(f"upstream {client.name} broke off {what} {got} ({type(e).__name__})"))
        except asyncio.CancelledError:
            download.fail(ProxyError(503, "UNAVAILABLE", "the proxy is shutting down"))
            raise
        except Exception as e:  # a bug or a full disk: the clients get an error, the log the trace
            log.exception("fetching %s failed", what)
            download.fail(bad_gateway(f"the proxy failed storing {what}: {e}"))
        finally:
            if self.active.get(digest) is download:
                del self.active[digest]
            if download.error is not None:
                log.warning("fetch %s from %s failed: %s", digest, client.name, download.error.message)
            if not kept:
                download.temp.unlink(missing_ok=True)
            download.finish()

    def _check_bounds(self, download: Download, client: UpstreamClient, what: str, elapsed: float) -> None:
        """Cut off a body with no announced length past the cache's size, and any body slower than the
        minimum average rate (layerstore.oci.bounded.fetch_deadline), so a trickle cannot hold a download forever."""
        if download.total is None and download.written > self.cache.capacity:
            raise bad_gateway(
                f"upstream {client.name} sent more than the proxy's whole cache ({format_size(self.cache.capacity)}) "
                f"for {what} without announcing a length; nothing was cached"
            )
        if elapsed > fetch_deadline(max(download.total or 0, download.written), self.fetch_timeout):
            self.metrics.upstream_errors.labels(client.name, "slow").inc()
            raise gateway_timeout(
                f"upstream {client.name} sent only {format_size(download.written)} of {what} in {elapsed:.0f} s; "
                "nothing was cached (a working link is faster: check the upstream)"
            )

    async def _receive(self, download: Download, client: UpstreamClient, response: aiohttp.ClientResponse, what: str) -> bool:
        loop = asyncio.get_running_loop()
        download.start(response.content_length)
        hasher = hashlib.sha256()

        def write(chunk: bytes, offset: int) -> None:  # off the event loop: hashing 1 MiB takes ~1 ms
            hasher.update(chunk)
            os.pwrite(download.fd, chunk, offset)

        started = loop.time()
        while chunk := await response.content.read(CHUNK):
            await loop.run_in_executor(self._io, write, chunk, download.written)
            download.progress(len(chunk))
            self.metrics.upstream_bytes.labels(client.name).inc(len(chunk))
            self._check_bounds(download, client, what, loop.time() - started)
        if download.total is not None and download.written != download.total:
            raise bad_gateway(
                f"upstream {client.name} sent {download.written} of the {download.total} bytes it announced for {what}"
            )
        actual = "sha256:" + hasher.hexdigest()
        if actual != download.digest:
            self.metrics.upstream_errors.labels(client.name, "digest").inc()
            raise bad_gateway(
                f"upstream {client.name} sent {what} with the wrong content (it hashes to {actual}); nothing was cached",
                code="DIGEST_INVALID",
            )
        download.verify()
        if not self.cache.fits(download.written):
            return False
        await loop.run_in_executor(self._io, self.cache.sync, download.fd)
        self.cache.admit(download.temp, download.digest, download.written)
        return True
