"""Bounded memory: a byte budget for CPU streams and a ring of fixed slots for staged (CUDA) streams."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable


class ByteBudget:
    """At most `limit` bytes held ahead of the consumer (None: unlimited, as in load() where the result is the memory).

    One allocation larger than the whole budget is let through when nothing else is held, so
    a tensor bigger than the pool still loads (peak: that tensor alone); asking for nothing always fits.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0

    def fits(self, nbytes: int) -> bool:
        return nbytes == 0 or self.limit is None or self.used == 0 or self.used + nbytes <= self.limit

    def take(self, nbytes: int) -> None:
        self.used += nbytes
        self.peak = max(self.peak, self.used)

    def give(self, nbytes: int) -> None:
        self.used -= nbytes


class SlotRing:
    """`count` fixed slots handed out in turn; a released slot is reused only once its `done` check passes.

    The slots' memory is allocated once by the owner (the CUDA path: one pinned host buffer).
    `done` is typically a CUDA event's query(): the copy out of the slot has finished.
    """

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError("a ring needs at least one slot")
        self.count = count
        self._free: deque[int] = deque(range(count))
        self._busy: deque[tuple[int, Callable[[], bool], Callable[[], None]]] = deque()

    def acquire(self) -> int | None:
        """A free slot, or None when every slot is in use (call poll() or wait_oldest())."""
        self.poll()
        return self._free.popleft() if self._free else None

    def release(self, slot: int, done: Callable[[], bool] = lambda: True, wait: Callable[[], None] = lambda: None) -> None:
        """Give `slot` back: it becomes free once done() is true (wait() blocks until it is)."""
        self._busy.append((slot, done, wait))

    def poll(self) -> None:
        """Free the released slots whose work has finished."""
        still: deque = deque()
        while self._busy:
            entry = self._busy.popleft()
            if entry[1]():
                self._free.append(entry[0])
            else:
                still.append(entry)
        self._busy = still

    def wait_oldest(self) -> bool:
        """Block until the oldest released slot is free; False if none is pending."""
        if not self._busy:
            return False
        slot, _, wait = self._busy.popleft()
        wait()
        self._free.append(slot)
        return True

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def pending(self) -> int:
        return len(self._busy)
