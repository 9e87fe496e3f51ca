"""Ranged reads of local files (file:// URLs and plain paths) with the same interface as the HTTP reader."""

from __future__ import annotations

import os
import threading

from weightstream.errors import CheckpointNotFound, FetchError
from weightstream.httpreader import NEVER, PIECE, Aborted, ObjectRef


class LocalRangeReader:
    """pread()s straight into the caller's memory; one descriptor per file, shared by all threads."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self.retries = 0

    def _fd(self, obj: ObjectRef) -> int:
        with self._lock:
            fd = self._fds.get(obj.key)
            if fd is None:
                try:
                    fd = os.open(obj.key, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except FileNotFoundError:
                    raise CheckpointNotFound(f"{obj.name} not found: check the path") from None
                except OSError as e:
                    raise FetchError(f"cannot open {obj.name}: {e.strerror}") from None
                self._fds[obj.key] = fd
            return fd

    def read_head(self, obj: ObjectRef, length: int, abort: threading.Event = NEVER) -> tuple[bytes, int]:
        """The first `length` bytes (fewer if the file is shorter) and the file's size."""
        fd = self._fd(obj)
        size = os.fstat(fd).st_size
        return os.pread(fd, min(length, size), 0), size

    def read_into(self, obj: ObjectRef, start: int, targets: list[memoryview], abort: threading.Event = NEVER) -> None:
        """Fill `targets` (in order) with the file's bytes from offset `start`."""
        fd = self._fd(obj)
        offset = start
        for target in targets:
            done = 0
            while done < len(target):
                if abort.is_set():
                    raise Aborted()
                try:
                    n = os.preadv(fd, [target[done : done + PIECE]], offset)
                except OSError as e:
                    raise FetchError(f"cannot read {obj.name} at byte {offset}: {e.strerror}") from None
                if n == 0:
                    raise FetchError(f"{obj.name} ended at byte {offset}: the file shrank while it was being read")
                done += n
                offset += n

    def interrupt(self, abort: threading.Event) -> None:
        """Local reads never block for long: the abort flag, checked per piece, is enough."""

    def close(self) -> None:
        """Close every file descriptor."""
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
