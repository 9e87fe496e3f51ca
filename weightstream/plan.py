"""Range planning: which bytes of which objects to GET, and where each byte lands.

Every wanted tensor (or tensor slice) becomes an Item with a byte buffer; the
wanted byte intervals of a file are merged across small gaps (read through
rather than paid for with another request) and cut into ranges of at most
`range_size` bytes. A range is a list of Pieces that cover it exactly, each
naming the item (or None: bytes to discard) and the offset in its buffer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from weightstream.format import TensorInfo
from weightstream.httpreader import ObjectRef
from weightstream.options import StreamOptions


@dataclass(frozen=True)
class TensorSlice:
    """Elements [start, stop) of dimension `dim`."""

    dim: int
    start: int
    stop: int

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        if not 0 <= self.dim < len(shape):
            raise ValueError(f"tensor {name!r} of shape {list(shape)} has no dimension {self.dim} to slice")
        if not 0 <= self.start <= self.stop <= shape[self.dim]:
            raise ValueError(
                f"slice [{self.start}, {self.stop}) is outside dimension {self.dim} (size {shape[self.dim]}) of {name!r}"
            )


@dataclass(eq=False)
class Item:
    """One tensor to deliver: its buffer holds `nbytes` bytes laid out as `buffer_shape`."""

    index: int
    name: str
    file: int
    info: TensorInfo
    slice: TensorSlice | None = None
    narrow_after: bool = False  # the whole tensor is read, then narrowed (pieces too small to fetch alone)
    dest: torch.Tensor | None = None  # a preallocated destination (load_into: the parameter itself)
    pending: int = 0  # ranges that still carry bytes for this item
    buffer: torch.Tensor | None = None  # uint8, filled by the sink
    event: object = None  # CUDA: the copy event after which the buffer is complete

    @property
    def out_shape(self) -> tuple[int, ...]:
        shape = list(self.info.shape)
        if self.slice is not None:
            shape[self.slice.dim] = self.slice.stop - self.slice.start
        return tuple(shape)

    @property
    def buffer_shape(self) -> tuple[int, ...]:
        return self.info.shape if self.slice is None or self.narrow_after else self.out_shape

    @property
    def nbytes(self) -> int:
        return math.prod(self.buffer_shape) * self.info.torch_dtype.itemsize

    def finish(self, buffer: torch.Tensor) -> torch.Tensor:
        """The delivered tensor: a zero-copy view of the byte buffer (narrowed and copied for read-whole slices)."""
        if self.dest is not None:
            return self.dest
        tensor = buffer.view(self.info.torch_dtype).reshape(self.buffer_shape)
        if self.narrow_after and self.slice is not None:
            tensor = tensor.narrow(self.slice.dim, self.slice.start, self.slice.stop - self.slice.start).contiguous()
        return tensor


@dataclass
class Piece:
    """`length` bytes of the object at `offset`, for `item`'s buffer at `dest` (item None: discard)."""

    offset: int
    length: int
    item: Item | None
    dest: int = 0


@dataclass(eq=False)
class RangeTask:
    """One ranged GET: bytes [start, end) of file `file`, covered exactly by `pieces`."""

    file: int
    ref: ObjectRef
    start: int
    end: int
    pieces: list[Piece] = field(default_factory=list)
    targets: list[memoryview] = field(default_factory=list)  # set by the sink when dispatched
    before: Callable[[int, int, int], None] | None = None  # set by the sink: (target, offset, length) about to be written
    slot: int | None = None  # CUDA: the ring slot the bytes land in
    event: object = None  # CUDA: recorded after the range's copies

    @property
    def length(self) -> int:
        return self.end - self.start

    def items(self) -> list[Item]:
        seen: dict[int, Item] = {}
        for piece in self.pieces:
            if piece.item is not None:
                seen.setdefault(piece.item.index, piece.item)
        return list(seen.values())


def item_pieces(item: Item, min_piece: int) -> list[Piece]:
    """The byte intervals an item needs, in file order. Sets item.narrow_after when reading whole is cheaper."""
    info = item.info
    if info.nbytes == 0:
        return []
    if item.slice is None:
        return [Piece(info.start, info.nbytes, item, 0)]
    s = item.slice
    itemsize = info.torch_dtype.itemsize
    inner = math.prod(info.shape[s.dim + 1 :]) * itemsize
    row = info.shape[s.dim] * inner
    outer = math.prod(info.shape[: s.dim])
    length = (s.stop - s.start) * inner
    if length == 0:
        return []
    if outer > 1 and length < min_piece:
        item.narrow_after = True
        return [Piece(info.start, info.nbytes, item, 0)]
    return [Piece(info.start + k * row + s.start * inner, length, item, k * length) for k in range(outer)]


def plan_ranges(file: int, ref: ObjectRef, pieces: list[Piece], options: StreamOptions) -> list[RangeTask]:
    """Merge a file's pieces across gaps up to coalesce_gap and cut them into ranges of at most range_size."""
    pieces = sorted(pieces, key=lambda p: p.offset)
    spans: list[list[Piece]] = []
    end = -1
    for piece in pieces:
        if spans and piece.offset - end <= options.coalesce_gap:
            if piece.offset > end:
                spans[-1].append(Piece(end, piece.offset - end, None))
            spans[-1].append(piece)
        else:
            spans.append([piece])
        end = piece.offset + piece.length
    ranges: list[RangeTask] = []
    for span in spans:
        current: RangeTask | None = None
        for piece in span:
            offset, dest, remaining = piece.offset, piece.dest, piece.length
            while remaining:
                if current is None or current.length == options.range_size:
                    current = RangeTask(file, ref, offset, offset)
                    ranges.append(current)
                take = min(remaining, options.range_size - current.length)
                current.pieces.append(Piece(offset, take, piece.item, dest))
                current.end += take
                offset += take
                dest += take
                remaining -= take
    for task in ranges:
        for item in task.items():
            item.pending += 1
    return ranges
