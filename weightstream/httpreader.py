"""Ranged GETs over plain HTTP(S), read with `readinto` straight into the caller's memory.

boto3 only resolves credentials/endpoint and presigns; the bytes travel through
stdlib `http.client` on one keep-alive connection per worker thread. A failed
or stalled attempt is retried from the first byte not yet received, with
exponential backoff and jitter.
"""

from __future__ import annotations

import http.client
import logging
import re
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from layerstore.retry import STALL_ATTEMPTS, Backoff, retryable_status
from weightstream.errors import CheckpointNotFound, FetchError
from weightstream.options import StreamOptions

log = logging.getLogger(__name__)

PIECE = 4 << 20  # bytes per readinto call: the unit of progress a retry resumes from
# A range fails after STALL_ATTEMPTS attempts in a row that got no byte within stall_timeout (progress resets the
# count), or after max_retries failed attempts without progress; the pauses between them: layerstore.retry.Backoff.
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class Aborted(Exception):
    """The stream was closed while this read was under way."""


NEVER = threading.Event()  # the abort flag of reads nobody aborts


class _Retryable(Exception):
    """One attempt failed in a way another attempt may not (5xx, reset, stall, truncation)."""


class _Stalled(_Retryable):
    """One attempt got no answer (or no further byte) within its timeout."""


class _Denied(Exception):
    """HTTP 403: the presigned URL may have expired; signing again is worth one try."""


@dataclass(frozen=True)
class ObjectRef:
    """An object to read: `name` for messages (its URL), `key` for the URL resolver."""

    name: str
    key: str


UrlResolver = Callable[[ObjectRef, bool], str]  # (object, refresh) -> URL (presigned or plain)


def _s3_error_code(body: bytes) -> str:
    match = re.search(rb"<Code>([^<]+)</Code>", body)
    return match.group(1).decode(errors="replace") if match else ""


class HttpRangeReader:
    """Reads byte ranges of objects by URL; safe to use from many threads (one connection per thread and host)."""

    def __init__(self, resolve: UrlResolver, options: StreamOptions) -> None:
        self._resolve = resolve
        self._options = options
        self._backoff = Backoff(options.backoff_base, options.backoff_max)
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._ssl = ssl.create_default_context()
        self._active: dict[int, tuple[threading.Event, socket.socket]] = {}
        self.retries = 0  # attempts that failed and were retried (for stats and tests)

    # -- connections ---------------------------------------------------------------------------------
    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        conn = conns.get((scheme, netloc))
        if conn is None:
            timeout = self._options.connect_timeout
            if scheme == "https":
                conn = http.client.HTTPSConnection(netloc, timeout=timeout, context=self._ssl)
            elif scheme == "http":
                conn = http.client.HTTPConnection(netloc, timeout=timeout)
            else:
                raise FetchError(f"unsupported URL scheme {scheme!r} for ranged reads")
            conns[(scheme, netloc)] = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _drop(self, scheme: str, netloc: str) -> None:
        conn = getattr(self._local, "conns", {}).pop((scheme, netloc), None)
        if conn is not None:
            conn.close()
            with self._lock:
                if conn in self._all:
                    self._all.remove(conn)

    def interrupt(self, abort: threading.Event) -> None:
        """Shut the sockets of reads running under `abort`, so a blocked recv() returns now, not at the stall timeout."""
        with self._lock:
            active = [sock for flag, sock in self._active.values() if flag is abort]
        for sock in active:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        """Close every connection this reader opened (from any thread)."""
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            try:
                conn.close()
            except OSError:
                pass

    # -- one request ---------------------------------------------------------------------------------
    def _get(
        self, obj: ObjectRef, first: int, last: int, refresh: bool, abort: threading.Event
    ) -> tuple[tuple[str, str], http.client.HTTPResponse]:
        url = self._resolve(obj, refresh)
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc)
        conn = self._connection(*key)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            conn.putrequest("GET", target, skip_accept_encoding=True)
            conn.putheader("Range", f"bytes={first}-{last}")
            conn.endheaders()
            if conn.sock is not None:
                conn.sock.settimeout(self._options.stall_timeout)
                with self._lock:  # the socket itself: a "Connection: close" response takes it over from conn
                    self._active[threading.get_ident()] = (abort, conn.sock)
            response = conn.getresponse()
        except TimeoutError:
            self._drop(*key)
            raise _Stalled(f"no answer from {parts.netloc}") from None
        except (OSError, http.client.HTTPException) as e:
            self._drop(*key)
            raise _Retryable(f"request failed: {type(e).__name__}: {e}") from None
        return key, response

    def _check_status(
        self, obj: ObjectRef, key: tuple[str, str], response: http.client.HTTPResponse, first: int, last: int
    ) -> None:
        """Raise for anything but the partial content asked for (or a whole object from offset 0)."""
        status = response.status
        if status == 206:
            match = _CONTENT_RANGE.fullmatch(response.getheader("Content-Range", "").strip())
            if not match or int(match.group(1)) != first or int(match.group(2)) > last:
                self._drop(*key)
                raise FetchError(
                    f"{obj.name}: asked for bytes {first}-{last}, server sent {response.getheader('Content-Range')!r}"
                )
            return
        if status == 200 and first == 0:
            return  # a server that ignores Range sends the whole object; the caller takes the prefix
        try:
            body = response.read(64 * 1024) if status != 200 else b""
        except (OSError, http.client.HTTPException):
            body = b""
        self._drop(*key)
        code = _s3_error_code(body)
        detail = f"HTTP {status}{' ' + code if code else ''}"
        if retryable_status(status):
            raise _Retryable(detail)
        if status == 404:
            raise CheckpointNotFound(f"{obj.name} not found ({detail}): check the URL")
        if status == 403:
            raise _Denied(detail)
        if status == 416:
            raise FetchError(
                f"{obj.name}: bytes {first}-{last} are beyond the object ({detail}): "
                "it is shorter than its header says, or changed during the load"
            )
        if status == 200:
            raise FetchError(
                f"{obj.name}: the server ignored the Range header (HTTP 200 for bytes {first}-{last}): "
                "use an S3-compatible endpoint"
            )
        raise FetchError(f"{obj.name}: GET bytes {first}-{last} failed with {detail}")

    # -- retries -------------------------------------------------------------------------------------
    def _run(self, obj: ObjectRef, what: str, abort: threading.Event, attempt: Callable[[bool, list[int]], object]) -> object:
        """Call attempt(refresh, progress) until it succeeds; progress[0] is bytes received so far."""
        progress = [0]
        failures = stalls = 0
        refresh = False
        last_error = ""
        while True:
            if abort.is_set():
                raise Aborted()
            before = progress[0]
            stalled = False
            try:
                return attempt(refresh, progress)
            except (OSError, http.client.HTTPException) as e:
                if abort.is_set():
                    raise Aborted() from None
                for key in list(getattr(self._local, "conns", {})):
                    self._drop(*key)
                last_error = f"{type(e).__name__}: {e}"
                stalled = isinstance(e, TimeoutError)
            except _Denied as e:
                if refresh:
                    raise FetchError(
                        f"{obj.name}: access denied ({e}): check the AWS credentials and the bucket policy"
                    ) from None
                refresh = True  # the presigned URL may have expired: sign again once
                continue
            except _Retryable as e:
                if abort.is_set():
                    raise Aborted() from None
                last_error = str(e)
                stalled = isinstance(e, _Stalled)
            finally:
                with self._lock:
                    self._active.pop(threading.get_ident(), None)
            if progress[0] > before:
                failures, stalls = 1, int(stalled)
            else:
                failures, stalls = failures + 1, stalls + int(stalled)
            if stalls >= STALL_ATTEMPTS:
                raise FetchError(
                    f"{obj.name}: {what}: the server sent nothing for {self._options.stall_timeout:g} s, "
                    f"{stalls} times in a row ({last_error}); check the endpoint and the network"
                )
            if failures > self._options.max_retries:
                raise FetchError(
                    f"{obj.name}: {what} failed after {self._options.max_retries} retries ({last_error}); "
                    "check the endpoint and the network"
                )
            with self._lock:
                self.retries += 1
            delay = self._backoff.delay(failures)
            log.info("%s: %s: %s; retrying in %.2fs", obj.name, what, last_error, delay)
            if abort.wait(delay):
                raise Aborted()

    def read_head(self, obj: ObjectRef, length: int, abort: threading.Event = NEVER) -> tuple[bytes, int]:
        """The first `length` bytes (fewer if the object is shorter) and the object's total size."""

        def attempt(refresh: bool, progress: list[int]) -> tuple[bytes, int]:
            key, response = self._get(obj, 0, length - 1, refresh, abort)
            if response.status == 416:  # an empty object has no byte 0
                response.read()
                return b"", 0
            self._check_status(obj, key, response, 0, length - 1)
            if response.status == 206:
                total_text = _CONTENT_RANGE.fullmatch(response.getheader("Content-Range").strip()).group(3)
                size = int(total_text) if total_text != "*" else -1
            else:
                size = int(response.getheader("Content-Length", "-1"))
            want = min(length, size) if size >= 0 else length
            buf = bytearray(want)
            self._fill(key, response, [memoryview(buf)], [0], want, abort)
            if response.status == 200 and not response.isclosed():
                self._drop(*key)
            if size < 0:
                raise FetchError(f"{obj.name}: the server did not say how large the object is (no Content-Range total)")
            return bytes(buf), size

        return self._run(obj, "reading the header", abort, attempt)  # type: ignore[return-value]

    calls_before = True  # read_into calls `before` piece by piece (engine.Engine: else it is called up front)

    def read_into(
        self,
        obj: ObjectRef,
        start: int,
        targets: list[memoryview],
        abort: threading.Event = NEVER,
        before: Callable[[int, int, int], None] | None = None,
    ) -> None:
        """Fill `targets` (in order) with the object's bytes from offset `start`; before(i, offset, length) runs
        just before each piece of targets[i] is written (the host sink faults its pages in there, so the bytes
        arrive in cache-warm memory)."""
        total = sum(len(t) for t in targets)
        if total == 0:
            return

        def attempt(refresh: bool, progress: list[int]) -> None:
            first = start + progress[0]
            key, response = self._get(obj, first, start + total - 1, refresh, abort)
            self._check_status(obj, key, response, first, start + total - 1)
            if response.status == 206:
                end = int(_CONTENT_RANGE.fullmatch(response.getheader("Content-Range").strip()).group(2))
                if end != start + total - 1:
                    self._drop(*key)
                    raise FetchError(
                        f"{obj.name}: asked for bytes {first}-{start + total - 1}, the object ends at byte {end}: "
                        "it is shorter than its header says, or changed during the load"
                    )
            self._fill(key, response, targets, progress, total, abort, before)
            if response.status == 200 or not response.isclosed():
                self._drop(*key)  # a whole-object answer or an over-long body: the connection is not reusable

        self._run(obj, f"bytes {start}-{start + total - 1}", abort, attempt)

    def _fill(
        self,
        key: tuple[str, str],
        response: http.client.HTTPResponse,
        targets: list[memoryview],
        progress: list[int],
        total: int,
        abort: threading.Event,
        before: Callable[[int, int, int], None] | None = None,
    ) -> None:
        """readinto the targets from progress[0] on, in PIECE-sized calls, advancing progress."""
        skip = progress[0]
        expected = total - skip
        length = response.getheader("Content-Length")
        if response.status == 206 and length is not None and int(length) != expected:
            self._drop(*key)
            raise _Retryable(f"Content-Length {length} for a {expected}-byte range")
        try:
            for index, target in enumerate(targets):
                if skip >= len(target):
                    skip -= len(target)
                    continue
                offset, skip = skip, 0
                while offset < len(target):
                    if abort.is_set():
                        self._drop(*key)
                        raise Aborted()
                    piece = target[offset : offset + PIECE]
                    if before is not None:
                        before(index, offset, len(piece))
                    n = response.readinto(piece)
                    if not n:
                        self._drop(*key)
                        raise _Retryable(f"body truncated after {progress[0]} of {total} bytes")
                    offset += n
                    progress[0] += n
        except TimeoutError:
            self._drop(*key)
            raise _Stalled(f"connection stalled after {progress[0]} of {total} bytes") from None
        except (OSError, http.client.HTTPException) as e:
            self._drop(*key)
            raise _Retryable(f"connection {type(e).__name__}: {e} after {progress[0]} of {total} bytes") from None
