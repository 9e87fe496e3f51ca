"""The streaming engine: concurrent ranged reads into a sink, tensors handed out in file order.

The main thread dispatches ranges (in file order, while the sink's memory
allows), collects finished reads, hashes them in file order when verifying,
and yields each tensor once all of its bytes are in place. Worker threads do
nothing but reads. On any error, or when the consumer stops early, in-flight
reads are aborted and nothing partial is handed out.

Dispatching happens in the consumer's thread (this is a generator): while the
consumer works on a tensor, the reads already in flight (up to `concurrency`
ranges) continue, but no new ones start until it asks for the next tensor.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Protocol

import torch

from weightstream.errors import IntegrityError
from weightstream.format import Header
from weightstream.httpreader import Aborted, ObjectRef
from weightstream.plan import Item, RangeTask

log = logging.getLogger(__name__)


class Reader(Protocol):
    def read_into(self, obj: ObjectRef, start: int, targets: list[memoryview], abort: threading.Event = ...) -> None: ...


class Sink(Protocol):
    def can_start(self, task: RangeTask, head: Item | None = None) -> bool: ...
    def start(self, task: RangeTask) -> None: ...
    def prepare(self, task: RangeTask) -> None: ...
    def complete(self, task: RangeTask) -> None: ...
    def finished(self, task: RangeTask) -> None: ...
    def ready(self, item: Item) -> bool: ...
    def wait(self, item: Item) -> None: ...
    def wait_any(self) -> bool: ...
    def take(self, item: Item) -> torch.Tensor: ...
    def close(self) -> None: ...


@dataclass
class StreamStats:
    """What a stream did: bytes delivered and fetched, requests, retries, wall time."""

    tensors: int = 0
    bytes_delivered: int = 0
    bytes_fetched: int = 0
    ranges: int = 0
    retries: int = 0
    seconds: float = 0.0
    peak_held: int = 0  # CPU streams: most bytes allocated ahead of the consumer at once
    bytes_received: int = 0  # read-once streams (weightstream.readonce): bytes that came from the other ranks

    @property
    def gbps(self) -> float:
        """Fetched bytes per second, in GB/s (10^9)."""
        return self.bytes_fetched / self.seconds / 1e9 if self.seconds else 0.0


class _FileHash:
    """sha256 of one file, fed range by range in file order."""

    def __init__(self, header: Header, expected: str, name: str) -> None:
        self.sha = hashlib.sha256(header.raw)
        self.cursor = header.data_start
        self.size = header.size
        self.expected = expected.lower()
        self.name = name
        self.waiting: dict[int, RangeTask] = {}
        self.verified = False

    def feed(self, task: RangeTask, sink: Sink) -> None:
        self.waiting[task.start] = task
        while self.cursor in self.waiting:
            done = self.waiting.pop(self.cursor)
            for view in done.targets:
                self.sha.update(view)
            self.cursor = done.end
            sink.finished(done)
            done.targets = []  # the views pin the tensors' memory: drop them once hashed
        self.check()

    def check(self) -> None:
        if self.cursor == self.size and not self.verified:
            actual = self.sha.hexdigest()
            if actual != self.expected:
                raise IntegrityError(
                    f"{self.name}: sha256 is {actual}, the manifest says {self.expected}: the object is corrupt or was replaced; "
                    "re-upload it or fix the manifest"
                )
            self.verified = True


class Engine:
    """Runs one stream: `ranges` fill `items` through `sink`; iterate to get (item, tensor) in order."""

    def __init__(
        self,
        items: list[Item],
        ranges: list[RangeTask],
        sink: Sink,
        reader: Reader,
        pool: ThreadPoolExecutor,
        concurrency: int,
        headers: list[Header] | None = None,
        digests: dict[int, tuple[str, str]] | None = None,
        dtype: torch.dtype | None = None,
        stats: StreamStats | None = None,
    ) -> None:
        self.items = items
        self.ranges = ranges
        self.sink = sink
        self.reader = reader
        self.pool = pool
        self.concurrency = concurrency
        self.dtype = dtype
        self.stats = stats if stats is not None else StreamStats()
        self.abort = threading.Event()
        self.hashes: dict[int, _FileHash] = {}
        for file, (expected, name) in (digests or {}).items():
            assert headers is not None
            self.hashes[file] = _FileHash(headers[file], expected, name)
            self.hashes[file].check()  # a file without data bytes is complete already

    def _read(self, task: RangeTask) -> None:
        """Worker thread: let the sink place the range (mapping on first touch), then read it; the sink's
        `before` hook (fault the pages in) runs piece by piece inside the read where the reader supports it."""
        if self.abort.is_set():
            raise Aborted()
        self.sink.prepare(task)
        before, task.before = task.before, None  # the hook holds the tensors' memory: not kept past the read
        if before is None:
            self.reader.read_into(task.ref, task.start, task.targets, self.abort)
        elif getattr(self.reader, "calls_before", False):
            self.reader.read_into(task.ref, task.start, task.targets, self.abort, before)
        else:
            for index, target in enumerate(task.targets):
                before(index, 0, len(target))
            self.reader.read_into(task.ref, task.start, task.targets, self.abort)

    def _deliver(self, item: Item) -> torch.Tensor:
        tensor = self.sink.take(item)
        if self.dtype is not None and tensor.is_floating_point() and tensor.dtype != self.dtype:
            tensor = tensor.to(self.dtype)
        self.stats.tensors += 1
        self.stats.bytes_delivered += tensor.numel() * tensor.element_size()
        return tensor

    def _gate(self, item: Item) -> bool:
        file_hash = self.hashes.get(item.file)
        return file_hash is None or file_hash.verified

    def _finish_range(self, task: RangeTask) -> None:
        self.sink.complete(task)
        self.stats.bytes_fetched += task.length
        self.stats.ranges += 1
        file_hash = self.hashes.get(task.file)
        if file_hash is not None:
            file_hash.feed(task, self.sink)
        else:
            self.sink.finished(task)
            task.targets = []  # the views pin the tensors' memory: the consumer decides when it goes

    def __iter__(self) -> Iterator[tuple[Item, torch.Tensor]]:
        started = time.perf_counter()
        pending = deque(self.ranges)
        inflight: dict[Future, RangeTask] = {}
        position = 0
        retries_before = getattr(self.reader, "retries", 0)
        try:
            while position < len(self.items):
                head = self.items[position]
                while pending and len(inflight) < self.concurrency and self.sink.can_start(pending[0], head):
                    task = pending.popleft()
                    self.sink.start(task)
                    future = self.pool.submit(self._read, task)
                    inflight[future] = task
                item = self.items[position]
                if item.pending == 0 and self._gate(item):
                    if not self.sink.ready(item) and not inflight:
                        self.sink.wait(item)
                    if self.sink.ready(item) or not inflight:
                        position += 1
                        yield item, self._deliver(item)
                        continue
                if not inflight:
                    if self.sink.wait_any():
                        continue
                    raise RuntimeError(f"internal: stream stalled before tensor {item.name!r} with nothing in flight")
                done, _ = wait(inflight, timeout=0.005 if item.pending == 0 else None, return_when=FIRST_COMPLETED)
                for future in done:
                    task = inflight.pop(future)
                    future.result()  # raises the read's error: the finally below aborts the rest
                    self._finish_range(task)
        finally:
            self.abort.set()
            for future in inflight:
                future.cancel()
            if inflight and hasattr(self.reader, "interrupt"):
                self.reader.interrupt(self.abort)  # reads blocked in recv() return now, not at the stall timeout
            wait(list(inflight))
            self.sink.close()
            self.stats.seconds = time.perf_counter() - started
            self.stats.retries = getattr(self.reader, "retries", 0) - retries_before
            budget = getattr(self.sink, "budget", None)
            self.stats.peak_held = budget.peak if budget is not None else 0
            for item in self.items:
                item.buffer = None
            if inflight:
                log.debug("stream closed with %d reads in flight", len(inflight))

    @staticmethod
    def is_abort(error: BaseException) -> bool:
        return isinstance(error, Aborted)
