"""Host buffers for tensors: populated up front, on transparent huge pages where the kernel offers them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from weightstream.hostsink import allocate_host

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _mapping_kb(address: int, field: str) -> int:
    """`field` (kB) of the mapping of this process that contains `address`, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and head == f"{field}:":
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_large_buffer_is_resident_and_writable() -> None:
    buffer = allocate_host(64 << 20)
    assert buffer.dtype == torch.uint8 and buffer.numel() == 64 << 20
    assert _mapping_kb(buffer.data_ptr(), "Rss") >= 64 << 10  # populated before any byte is written
    buffer[-1] = 7
    assert int(buffer[-1]) == 7


def test_small_buffer_is_plain_memory() -> None:
    assert allocate_host(4096).numel() == 4096


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="transparent huge pages are off on this kernel")
def test_large_buffer_is_on_huge_pages() -> None:
    buffer = allocate_host(64 << 20)
    assert _mapping_kb(buffer.data_ptr(), "AnonHugePages") >= 32 << 10  # most of it on 2 MiB pages


def test_sink_populates_each_piece_just_before_it_is_written() -> None:
    """A range's worker faults in only the piece of a tensor's buffer it is about to receive (not the whole tensor
    in front of it, so the other ranges of a large tensor do not wait on one thread clearing all of its pages)."""
    from weightstream.format import TensorInfo
    from weightstream.hostsink import HostSink
    from weightstream.httpreader import ObjectRef
    from weightstream.options import StreamOptions
    from weightstream.plan import Item, item_pieces, plan_ranges
    from weightstream.pool import ByteBudget

    nbytes = 64 << 20
    item = Item(0, "w", 0, TensorInfo("w", "U8", (nbytes,), 0, nbytes))
    ranges = plan_ranges(0, ObjectRef("x", "x"), item_pieces(item, 1), StreamOptions(range_size=16 << 20))
    sink = HostSink(ByteBudget(None))
    sink.start(ranges[0])
    sink.prepare(ranges[0])
    assert item.buffer is not None and item.buffer.numel() == nbytes
    assert _mapping_kb(item.buffer.data_ptr(), "Rss") <= 2 << 10, "mapping a tensor's buffer populated it"
    assert ranges[0].before is not None
    ranges[0].before(0, 4 << 20, 4 << 20)  # the second 4 MiB piece of the first range
    resident = _mapping_kb(item.buffer.data_ptr(), "Rss")
    assert 4 << 10 <= resident <= 6 << 10, f"{resident} kB resident after one 4 MiB piece of a 64 MiB tensor"
    for task in ranges[1:]:
        sink.start(task)
        sink.prepare(task)
        task.before(0, 0, len(task.targets[0]))
    ranges[0].before(0, 0, 16 << 20)
    assert _mapping_kb(item.buffer.data_ptr(), "Rss") >= 64 << 10
    sink.close()
