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
