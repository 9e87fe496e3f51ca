"""The CPU sink: bytes land straight in each tensor's own memory; tensors are zero-copy views of it."""

from __future__ import annotations

import ctypes
import mmap
import threading

import torch

from weightstream.plan import Item, RangeTask
from weightstream.pool import ByteBudget

PREFAULT_MIN = 1 << 20
_MAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14+
_libc = ctypes.CDLL(None, use_errno=True)  # a ctypes call releases the GIL (mmap.madvise() holds it)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def _madvise_at(address: int, length: int, advice: int) -> bool:
    """madvise() over [address, address + length) with the GIL released; False if the kernel refused it."""
    return _libc.madvise(address, length, advice) == 0


def _madvise(buffer: mmap.mmap, advice: int) -> bool:
    """madvise() over the whole mapping with the GIL released; False if the kernel refused the advice."""
    anchor = ctypes.c_char.from_buffer(buffer)
    try:
        return _madvise_at(ctypes.addressof(anchor), len(buffer), advice)
    finally:
        del anchor


def map_host(nbytes: int) -> tuple[torch.Tensor, bool]:
    """Uninitialized CPU bytes for one tensor, not yet populated where the kernel can populate parts later
    (then the second value is True: call populate() on each part before writing it). Large buffers are anonymous
    mappings advised MADV_HUGEPAGE (2 MiB pages populate 1.5-3x faster than 4 KiB ones here: 1.5-1.9 GB/s vs
    2.4-4.5 GB/s); without MADV_POPULATE_WRITE (Linux < 5.14) the mapping is populated whole by MAP_POPULATE.
    The tensor owns the mapping: it is unmapped when the last view of it goes."""
    if nbytes < PREFAULT_MIN:
        return torch.empty(nbytes, dtype=torch.uint8), False
    buffer = mmap.mmap(-1, nbytes, flags=_MAP_FLAGS)
    _madvise(buffer, _MADV_HUGEPAGE)  # refused where THP is off: 4 KiB pages then
    tensor = torch.frombuffer(buffer, dtype=torch.uint8)
    if populate(tensor, 0, 1):  # the first page: also asks whether the kernel knows MADV_POPULATE_WRITE
        return tensor, True
    del tensor
    buffer.close()
    buffer = mmap.mmap(-1, nbytes, flags=_MAP_FLAGS | getattr(mmap, "MAP_POPULATE", 0))
    return torch.frombuffer(buffer, dtype=torch.uint8), False


def populate(buffer: torch.Tensor, start: int, end: int) -> bool:
    """Fault in bytes [start, end) of a map_host() buffer in one call (MADV_POPULATE_WRITE, GIL released): first-touch
    faults taken by 16 receiving threads at once contend on the page tables (measured here: 1.4 GB/s into fresh
    memory vs 6 GB/s into prefaulted), while each thread populating its own range before reading into it spreads
    the kernel's page clearing over the threads instead of one thread zeroing a whole tensor while the other ranges
    of that tensor wait. False if the kernel refused (the writes then fault the pages in)."""
    if end <= start:
        return True
    address = buffer.data_ptr() + start
    aligned = address & ~(mmap.PAGESIZE - 1)
    return _madvise_at(aligned, address + end - start - aligned, _MADV_POPULATE_WRITE)


def allocate_host(nbytes: int) -> torch.Tensor:
    """Uninitialized CPU bytes for one tensor, populated up front (map_host + populate of the whole buffer)."""
    tensor, lazy = map_host(nbytes)
    if lazy:
        populate(tensor, 0, nbytes)
    return tensor


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's memory (the same bytes, no copy)."""
    if not tensor.is_contiguous():
        raise ValueError("destination tensors must be contiguous")
    return tensor.detach().reshape(-1).view(torch.uint8)


def writable(buffer: torch.Tensor) -> memoryview:
    """A writable memoryview of a CPU uint8 tensor (for readinto/preadv)."""
    return memoryview(buffer.numpy()).cast("B")


class HostSink:
    """Reserves each item's bytes in a ByteBudget when its first range is dispatched (main thread); the worker
    that reads the item's first range maps the buffer, and every range's worker populates its own part of it,
    piece by piece just before reading into it (page population runs beside the downloads, spread over the
    threads, and the freshly cleared pages are still in cache when the received bytes are copied into them)."""

    def __init__(self, budget: ByteBudget) -> None:
        self.budget = budget
        self._reserved: dict[int, threading.Lock] = {}
        self._counted: set[int] = set()
        self._views: dict[int, memoryview] = {}
        self._lazy: set[int] = set()  # items whose mapping each range populates for itself
        self._local = threading.local()

    # -- main thread ---------------------------------------------------------------------------------
    def can_start(self, task: RangeTask, head: Item | None = None) -> bool:
        """Within the budget, or carrying bytes of `head`, the next tensor to hand out (else a range holding the
        tail of one big tensor and the start of the next could wait forever): peak is about pool + two tensors."""
        need = sum(i.nbytes for i in task.items() if i.index not in self._reserved and i.dest is None)
        return self.budget.fits(need) or (head is not None and any(i is head for i in task.items()))

    def start(self, task: RangeTask) -> None:
        for item in task.items():
            if item.index not in self._reserved:
                self._reserved[item.index] = threading.Lock()
                if item.dest is None:
                    self.budget.take(item.nbytes)
                    self._counted.add(item.index)

    # -- worker thread -------------------------------------------------------------------------------
    def _view(self, item: Item) -> memoryview:
        """The item's memory, mapped by the first range that needs it (mapping is cheap: population is per range)."""
        with self._reserved[item.index]:
            view = self._views.get(item.index)
            if view is None:
                if item.dest is not None:
                    item.buffer = byte_view(item.dest)
                else:
                    item.buffer, lazy = map_host(item.nbytes)
                    if lazy:
                        self._lazy.add(item.index)
                view = self._views[item.index] = writable(item.buffer)
            return view

    def _scratch(self, length: int) -> memoryview:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None or len(scratch) < length:
            scratch = self._local.scratch = bytearray(length)
        return memoryview(scratch)[:length]

    def prepare(self, task: RangeTask) -> None:
        """Map (first range of an item) and point the range's targets at the items' memory. The pages of a mapped
        buffer are faulted in by task.before, piece by piece just ahead of the bytes (this thread's part only, and
        warm in cache when the copy out of the socket writes them)."""
        task.targets = [
            self._scratch(p.length) if p.item is None else self._view(p.item)[p.dest : p.dest + p.length] for p in task.pieces
        ]
        spots = [(p.item.buffer, p.dest) if p.item is not None and p.item.index in self._lazy else None for p in task.pieces]
        if any(spots):

            def before(index: int, offset: int, length: int) -> None:
                spot = spots[index]
                if spot is not None:
                    populate(spot[0], spot[1] + offset, spot[1] + offset + length)

            task.before = before

    # -- main thread, after the reads ------------------------------------------------------------------
    def complete(self, task: RangeTask) -> None:
        for item in task.items():
            item.pending -= 1

    def finished(self, task: RangeTask) -> None:
        """The range's bytes have been hashed (if verifying); nothing is held for it here."""

    def ready(self, item: Item) -> bool:
        return item.pending == 0

    def wait(self, item: Item) -> None:
        """Items are complete as soon as their last range is (readinto wrote the final memory)."""

    def wait_any(self) -> bool:
        return False

    def take(self, item: Item) -> torch.Tensor:
        if item.index not in self._reserved:  # an item without bytes (empty tensor) was never dispatched
            self._reserved[item.index] = threading.Lock()
        self._view(item)
        tensor = item.finish(item.buffer)
        if item.index in self._counted:
            self.budget.give(item.nbytes)
            self._counted.discard(item.index)
        self._views.pop(item.index, None)
        self._lazy.discard(item.index)
        item.buffer = None  # the consumer owns the memory now
        return tensor

    def close(self) -> None:
        self._views.clear()
        self._lazy.clear()
