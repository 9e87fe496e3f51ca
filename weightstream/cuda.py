"""The CUDA sink: network -> one pinned host ring -> asynchronous copies on a side stream -> device tensors.

The ring is allocated once (anonymous mmap, page-locked with cudaHostRegister:
exactly pool_bytes, where tensor.pin_memory() would round up to a power of
two). Each range is read into a free slot; its pieces are copied with
non_blocking copies on a side stream, an event is recorded, and the slot is
reused only after that event has completed, so downloads of later ranges
overlap the copies of earlier ones. Device tensors are allocated before their
bytes arrive (all of them up front for load()), and an item is handed out only
after the event covering its last copy has completed.
"""

from __future__ import annotations

import mmap

import torch

from weightstream.errors import WeightsError
from weightstream.hostsink import byte_view
from weightstream.plan import Item, RangeTask
from weightstream.pool import SlotRing


class PinnedRing:
    """`slots` x `slot_bytes` of page-locked host memory, allocated and registered once."""

    def __init__(self, slots: int, slot_bytes: int) -> None:
        self.slot_bytes = slot_bytes
        self.nbytes = slots * slot_bytes
        self._map = mmap.mmap(-1, self.nbytes)  # page-aligned, not yet touched
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)
        self._views = [memoryview(self._map)[i * slot_bytes : (i + 1) * slot_bytes] for i in range(slots)]
        self._registered = False
        status = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), self.nbytes, 1)  # 1: portable
        if int(status) != 0:
            self.close()
            raise WeightsError(
                f"cannot page-lock a {self.nbytes}-byte staging ring (cudaHostRegister error {int(status)}): "
                "lower pool_bytes or raise the memlock limit (ulimit -l)"
            )
        self._registered = True
        self.ring = SlotRing(slots)

    def slot_view(self, slot: int) -> memoryview:
        return self._views[slot]

    def slot_tensor(self, slot: int) -> torch.Tensor:
        return self.tensor[slot * self.slot_bytes : (slot + 1) * self.slot_bytes]

    def close(self) -> None:
        """Unregister and free the ring (callers make sure no copy out of it is still running)."""
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self._registered = False
        self._views = []
        self.tensor = None  # type: ignore[assignment]
        try:
            self._map.close()
        except BufferError:
            pass  # a view is still exported somewhere; the mapping goes when it does


class CudaSink:
    """Stages ranges through a PinnedRing into device tensors on `device`."""

    def __init__(self, device: torch.device, slots: int, slot_bytes: int, items: list[Item] | None = None) -> None:
        if not torch.cuda.is_available():
            raise WeightsError(f"device {device} requested but CUDA is not available: use device='cpu'")
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.pinned = PinnedRing(slots, slot_bytes)
        self.ring = self.pinned.ring
        self._hold: dict[int, bool] = {}  # slot -> still needed for hashing
        if items is not None:  # load(): every device tensor up front, so an out-of-memory fails before any download
            for item in items:
                self._allocate(item)

    def _allocate(self, item: Item) -> None:
        if item.buffer is None:
            if item.dest is not None:
                item.buffer = byte_view(item.dest)
            else:
                item.buffer = torch.empty(item.nbytes, dtype=torch.uint8, device=self.device)
                item.buffer.record_stream(self.stream)  # written on the side stream: keep the allocator from reusing it early

    def can_start(self, task: RangeTask, head: Item | None = None) -> bool:
        self.ring.poll()
        return self.ring.free > 0

    def start(self, task: RangeTask) -> None:
        slot = self.ring.acquire()
        if slot is None:
            raise RuntimeError("internal: CUDA sink started a range without a free slot")
        task.slot = slot
        for item in task.items():
            self._allocate(item)
        task.targets = [self.pinned.slot_view(slot)[: task.length]]

    def prepare(self, task: RangeTask) -> None:
        """Worker side: nothing to do, the slot was chosen when the range was started."""

    def complete(self, task: RangeTask) -> None:
        """Queue the range's copies on the side stream; the slot frees when they (and any hashing) are done."""
        source = self.pinned.slot_tensor(task.slot)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            position = 0
            for piece in task.pieces:
                if piece.item is not None:
                    dst = piece.item.buffer[piece.dest : piece.dest + piece.length]
                    dst.copy_(source[position : position + piece.length], non_blocking=True)
                position += piece.length
            event = torch.cuda.Event(blocking=True)  # waiters sleep instead of spinning a core
            event.record(self.stream)
        for item in task.items():
            item.pending -= 1
            if item.pending == 0:
                item.event = event  # copies run in stream order: this event covers all of the item's copies
        task.event = event

    def finished(self, task: RangeTask) -> None:
        """The range was hashed (or needs no hashing): release its slot once its copies are done."""
        event = task.event
        self.ring.release(task.slot, event.query, event.synchronize)

    def ready(self, item: Item) -> bool:
        return item.pending == 0 and (item.event is None or item.event.query())

    def wait(self, item: Item) -> None:
        if item.event is not None:
            item.event.synchronize()

    def wait_any(self) -> bool:
        return self.ring.wait_oldest()

    def take(self, item: Item) -> torch.Tensor:
        self._allocate(item)
        self.wait(item)
        tensor = item.finish(item.buffer)
        item.buffer = None
        item.event = None
        return tensor

    def close(self) -> None:
        """Wait for every queued copy, then free the ring."""
        self.stream.synchronize()
        self.pinned.close()
