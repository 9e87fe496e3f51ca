"""Bounds on every fetch from an image source: its declared size plus one byte, and a deadline.

A registry (or a proxy, or a file) can send more than a descriptor declares, or trickle a
byte at a time so that no read ever times out. Every manifest, config and layer fetch is
therefore read through a BoundedReader: it stops one byte past the declared size, and at a
deadline scaled from that size.

The deadline: DEADLINE_FLOOR (10 min) plus the time the declared size takes at
DEADLINE_MIN_RATE (256 KiB/s, about 2 Mbit/s). A 100 MB layer gets 16.5 min, a 5 GiB layer
5.9 h: a slow but working link finishes; an endless 1 B/s trickle is cut off. An explicit
deadline (`liftoff convert --fetch-timeout S`) replaces the formula for every fetch.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import BinaryIO

from layerstore.errors import ImageError, RegistryError
from layerstore.units import format_size

DEADLINE_FLOOR = 600.0  # seconds any fetch may take, however small
DEADLINE_MIN_RATE = 256 << 10  # bytes/s a fetch must average beyond the floor


def fetch_deadline(size: int, explicit: float | None = None) -> float:
    """Seconds one fetch of `size` declared bytes may take: `explicit` if given, else floor + size at the minimum rate."""
    if explicit is not None:
        return explicit
    return DEADLINE_FLOOR + max(0, size) / DEADLINE_MIN_RATE


class BoundedReader(io.RawIOBase):
    """Reads `raw`, refusing byte `limit` + 1 (ImageError) and any read after `seconds` (RegistryError).

    Reads use readinto1/read1 where the stream has them (files, urllib3), so each returns as soon as
    some bytes arrive and the deadline is checked between them; a read that gets nothing is
    bounded by the socket's own timeout. `what` names the fetch in errors ("blob sha256:...").
    """

    def __init__(
        self,
        raw: BinaryIO,
        *,
        limit: int,
        seconds: float,
        what: str,
        declared: str = "the manifest declares",
        expected: int | None = None,
        on_read: Callable[[int], None] | None = None,
    ) -> None:
        """`declared` says where `limit` came from; `expected` is the size shown in a deadline error (default `limit`);
        `on_read(n)` is told of every read's byte count (progress)."""
        self.raw = raw
        self.limit = limit
        self.expected = limit if expected is None else expected
        self.seconds = seconds
        self.what = what
        self.declared = declared
        self.count = 0
        self.on_read = on_read
        self.started = time.monotonic()
        self._readinto1 = getattr(raw, "readinto1", None)
        self._read1 = getattr(raw, "read1", None)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        elapsed = time.monotonic() - self.started
        if elapsed > self.seconds:
            raise self.too_slow(elapsed)
        want = min(len(view), self.limit + 1 - self.count)
        if want <= 0:
            return 0
        if self._readinto1 is not None:  # buffered files: no copy
            n = self._readinto1(view[:want]) or 0
        else:
            data = (self._read1(want) if self._read1 is not None else self.raw.read(want)) or b""
            n = len(data)
            view[:n] = data
        self.count += n
        if self.on_read is not None and n:
            self.on_read(n)
        if self.count > self.limit:
            raise ImageError(
                f"{self.what} sends more than the {self.limit} bytes {self.declared} (stopped after {self.count}): "
                "the source serves a wrong or hostile blob"
            )
        if n and time.monotonic() - self.started > self.seconds:
            raise self.too_slow(time.monotonic() - self.started)
        return n

    def too_slow(self, elapsed: float) -> RegistryError:
        """The deadline error: which fetch, how much arrived in how long, and what to do."""
        return RegistryError(
            f"{self.what}: only {format_size(self.count)} of {format_size(self.expected)} arrived in {elapsed:.1f} s "
            f"(deadline {self.seconds:.0f} s); on a slow link raise it with --fetch-timeout SECONDS, "
            "else the source is stalling: re-run later"
        )

    def read_all(self) -> bytes:
        """The whole (bounded) body."""
        out = bytearray()
        buffer = bytearray(1 << 16)
        while n := self.readinto(buffer):
            out += buffer[:n]
        return bytes(out)

    def close(self) -> None:
        try:
            self.raw.close()
        finally:
            super().close()
