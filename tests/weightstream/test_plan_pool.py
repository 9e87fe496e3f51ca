"""Range planning and the bounded pool (pure logic)."""

from __future__ import annotations

import itertools

import pytest
import torch

from weightstream.format import TensorInfo
from weightstream.httpreader import ObjectRef
from weightstream.options import StreamOptions
from weightstream.plan import Item, TensorSlice, item_pieces, plan_ranges
from weightstream.pool import ByteBudget, SlotRing

REF = ObjectRef("s3://b/m.safetensors", "m.safetensors")


def items_at(*spans: tuple[int, int], shape_of=lambda n: (n // 4,)) -> list[Item]:
    return [
        Item(i, f"t{i}", 0, TensorInfo(f"t{i}", "F32", shape_of(end - start), start, end)) for i, (start, end) in enumerate(spans)
    ]


def test_ranges_cover_pieces_exactly_split_at_range_size_and_count_pending():
    options = StreamOptions(range_size=64 * 1024, pool_bytes=1 << 20, coalesce_gap=0)
    items = items_at((100, 100 + 150_000), (100 + 150_000, 100 + 150_004), (100 + 150_004, 100 + 160_000))
    pieces = [p for item in items for p in item_pieces(item, options.min_piece)]
    ranges = plan_ranges(0, REF, pieces, options)
    assert [r.start for r in ranges] == [100, 100 + 65536, 100 + 131072]
    assert ranges[-1].end == 100 + 160_000
    for r in ranges:
        assert r.length <= options.range_size
        assert sum(p.length for p in r.pieces) == r.length
        assert r.pieces[0].offset == r.start
    assert [i.pending for i in items] == [3, 1, 1]
    # every byte of every item is written exactly once
    for item in items:
        covered = sorted((p.dest, p.dest + p.length) for r in ranges for p in r.pieces if p.item is item)
        assert covered[0][0] == 0 and covered[-1][1] == item.nbytes
        assert all(a[1] == b[0] for a, b in itertools.pairwise(covered))


def test_small_gaps_are_read_through_and_large_gaps_skipped():
    options = StreamOptions(range_size=1 << 20, pool_bytes=1 << 20, coalesce_gap=1000)
    items = items_at((0, 4000), (4500, 8500), (20_000, 24_000))
    pieces = [item_pieces(i, options.min_piece)[0] for i in items]
    ranges = plan_ranges(0, REF, pieces, options)
    assert [(r.start, r.end) for r in ranges] == [(0, 8500), (20_000, 24_000)]
    assert [p.item is None for p in ranges[0].pieces] == [False, True, False]


def test_slices_rows_are_one_piece_columns_are_pieces_or_whole():
    info = TensorInfo("w", "F32", (8, 1024, 64), 0, 8 * 1024 * 64 * 4)
    rows = Item(0, "w", 0, info, TensorSlice(0, 2, 4))
    assert [(p.offset, p.length) for p in item_pieces(rows, 256 * 1024)] == [(2 * 1024 * 64 * 4, 2 * 1024 * 64 * 4)]
    big = Item(1, "w", 0, info, TensorSlice(1, 0, 512))  # 8 pieces of 128 KiB
    assert len(item_pieces(big, 64 * 1024)) == 8 and not big.narrow_after
    small = Item(2, "w", 0, info, TensorSlice(2, 0, 32))  # 8192 pieces of 128 bytes: read whole, then narrow
    assert [(p.offset, p.length, p.item) for p in item_pieces(small, 64 * 1024)] == [(0, info.nbytes, small)]
    assert small.narrow_after and small.nbytes == info.nbytes and small.out_shape == (8, 1024, 32)
    with pytest.raises(ValueError, match="outside dimension 1"):
        TensorSlice(1, 0, 2000).check("w", info.shape)


def test_finish_is_a_zero_copy_view():
    info = TensorInfo("w", "BF16", (3, 5), 0, 30)
    item = Item(0, "w", 0, info)
    buffer = torch.arange(30, dtype=torch.uint8)
    tensor = item.finish(buffer)
    assert tensor.dtype == torch.bfloat16 and tensor.shape == (3, 5) and tensor.data_ptr() == buffer.data_ptr()


def test_budget_lets_one_oversized_allocation_through_when_empty():
    budget = ByteBudget(100)
    assert budget.fits(500)
    budget.take(500)
    assert not budget.fits(1)
    budget.give(500)
    budget.take(60)
    assert budget.fits(40) and not budget.fits(41)
    assert budget.peak == 500
    assert ByteBudget(None).fits(10**12)


def test_slot_ring_reuses_a_slot_only_after_its_work_is_done():
    ring = SlotRing(2)
    a, b = ring.acquire(), ring.acquire()
    assert {a, b} == {0, 1} and ring.acquire() is None
    done = {"a": False}
    waited = []
    ring.release(a, lambda: done["a"], lambda: waited.append(a))
    assert ring.acquire() is None  # released but its copy is still running
    done["a"] = True
    assert ring.acquire() == a
    ring.release(b, lambda: False, lambda: waited.append(b))
    assert ring.wait_oldest() and waited == [b]
    assert ring.acquire() == b
    assert not ring.wait_oldest()
