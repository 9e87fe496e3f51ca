"""Cut a layer's file contents into chunks.

Files of at least `chunk_size` bytes are cut into chunk_size pieces that
belong to them alone (the tail too), so the same large file dedupes across
layers and images whatever surrounds it. Smaller files are packed, in tar
order, into shared chunks of up to chunk_size bytes, so a start that reads
many small files costs few fetches. A small file never straddles two chunks.
"""

from __future__ import annotations

from collections.abc import Callable

DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 4 << 10
MAX_CHUNK_SIZE = 64 << 20

Extent = tuple[int, int, int]  # (chunk number, offset in chunk, length)
ReadInto = Callable[[memoryview], int]
Emit = Callable[[int, memoryview], None]


class Chunker:
    """Turns file contents into numbered chunks handed to `emit(number, data)`.

    The caller owns nothing after emit: each emitted buffer is fresh. Chunk
    numbers are assigned in order of creation; a pack chunk gets its number
    when its first file arrives and is emitted when full or at flush().
    """

    def __init__(self, chunk_size: int, emit: Emit) -> None:
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk size must be between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes")
        self.chunk_size = chunk_size
        self._emit = emit
        self.count = 0
        self._pack: bytearray | None = None
        self._pack_number = -1
        self._pack_used = 0

    def add_file(self, size: int, readinto: ReadInto) -> list[Extent]:
        """Read `size` bytes through `readinto` and return the file's extents."""
        if size == 0:
            return []
        if size >= self.chunk_size:
            extents = []
            left = size
            while left:
                n = min(left, self.chunk_size)
                buffer = bytearray(n)
                _fill(memoryview(buffer), readinto)
                number = self.count
                self.count += 1
                self._emit(number, memoryview(buffer))
                extents.append((number, 0, n))
                left -= n
            return extents
        if self._pack is None or self._pack_used + size > self.chunk_size:
            self.flush()
            self._pack = bytearray(self.chunk_size)
            self._pack_number = self.count
            self.count += 1
        offset = self._pack_used
        _fill(memoryview(self._pack)[offset : offset + size], readinto)
        self._pack_used += size
        return [(self._pack_number, offset, size)]

    def flush(self) -> None:
        """Emit the open pack chunk, if any."""
        if self._pack is not None:
            self._emit(self._pack_number, memoryview(self._pack)[: self._pack_used])
            self._pack = None
            self._pack_used = 0


def _fill(view: memoryview, readinto: ReadInto) -> None:
    done = 0
    while done < len(view):
        got = readinto(view[done:])
        if not got:
            raise EOFError("file data ended early")
        done += got
