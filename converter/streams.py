"""Stream plumbing for conversion: hashing readers and layer decompression."""

from __future__ import annotations

import hashlib
import io
from typing import BinaryIO

import zstandard
from isal import igzip_threaded

from layerstore.errors import ImageError

READ_SIZE = 1 << 20


class HashingReader(io.RawIOBase):
    """Passes reads through, hashing (sha256) and counting every byte."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()
        self.count = 0
        self._readinto = getattr(raw, "readinto", None)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        if self._readinto is not None:
            n = self._readinto(view) or 0
        else:
            data = self.raw.read(len(view))
            n = len(data)
            view[:n] = data
        if n:
            self.hash.update(view[:n])
            self.count += n
        return n

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()

    def drain(self) -> None:
        """Read (and hash) whatever is left of the stream."""
        buffer = bytearray(READ_SIZE)
        while self.readinto(buffer):
            pass


def decompressing_reader(compressed: BinaryIO, compression: str) -> BinaryIO:
    """A reader of the uncompressed tar. gzip decompresses on its own thread (isal, GIL released)."""
    if compression == "gzip":
        return igzip_threaded.open(compressed, "rb", threads=1, block_size=READ_SIZE)
    if compression == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(compressed, read_size=READ_SIZE, read_across_frames=True)
    if compression == "none":
        return compressed
    raise ImageError(f"unknown compression {compression!r}")
