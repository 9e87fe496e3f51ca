"""Tensor-parallel loading: each rank reads only its slice, so TP=N reads the model once in total.

Rules map tensor-name patterns to the dimension they are split on (0: rows,
e.g. column-parallel linear weights; 1: columns, e.g. row-parallel ones);
tensors matching no rule are replicated (read whole by every rank).

- dim 0 slices are one contiguous byte range: each rank GETs exactly its bytes.
- dim >= 1 slices are strided. Where the contiguous pieces are large (>= min_piece,
  e.g. per-expert blocks) each rank GETs exactly its pieces; where they are small
  (a few KB per row), per-row requests would cost far more than the bytes, so:
  * with a torch.distributed `group`, each rank GETs a disjoint block of rows and
    an all_to_all hands every rank its columns (network bytes: once in total);
  * without one, the rank reads the whole tensor and narrows it (counted in stats).

Gaps between a rank's pieces shorter than `coalesce_gap` are read through rather
than paid for with another request; pass coalesce_gap=0 for exact byte counts.
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Callable, Mapping

import torch

from weightstream.api import Checkpoint, NameFilter, name_filter, open
from weightstream.engine import StreamStats
from weightstream.plan import TensorSlice

Rules = Mapping[str, int] | Callable[[str], int | None]


def split_bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s share when `size` is split as evenly as possible (the first size % world get one more)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world}")
    base, extra = divmod(size, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def tp_slice(shape: tuple[int, ...], dim: int, rank: int, world: int) -> TensorSlice:
    """The slice of a tensor of `shape` that `rank` of `world` owns along `dim`."""
    if not 0 <= dim < len(shape):
        raise ValueError(f"cannot split a tensor of shape {list(shape)} on dimension {dim}")
    return TensorSlice(dim, *split_bounds(shape[dim], rank, world))


def rule_lookup(rules: Rules) -> Callable[[str], int | None]:
    """A name -> split dimension function from glob patterns (first match wins) or a callable."""
    if callable(rules):
        return rules
    ordered = list(rules.items())

    def lookup(name: str) -> int | None:
        for pattern, dim in ordered:
            if fnmatch.fnmatchcase(name, pattern):
                return dim
        return None

    return lookup


def tp_slices(rules: Rules, rank: int, world: int) -> Callable[[str, tuple[int, ...]], TensorSlice | None]:
    """A `slices=` argument for Checkpoint.stream/load: this rank's slice of every tensor a rule matches."""
    lookup = rule_lookup(rules)

    def slices(name: str, shape: tuple[int, ...]) -> TensorSlice | None:
        dim = lookup(name)
        return None if dim is None else tp_slice(shape, dim, rank, world)

    return slices


def _exchange(rows: torch.Tensor, shape: tuple[int, ...], dim: int, rank: int, world: int, group) -> torch.Tensor:
    """From this rank's block of rows (dim 0) of a tensor of `shape`, the full-height block of its columns along `dim`."""
    import torch.distributed as dist

    row_counts = [b - a for a, b in (split_bounds(shape[0], r, world) for r in range(world))]
    col_bounds = [split_bounds(shape[dim], r, world) for r in range(world)]
    parts = [rows.narrow(dim, a, b - a).reshape(-1) for a, b in col_bounds]
    send = torch.cat(parts) if parts else rows.reshape(-1)
    mine = col_bounds[rank][1] - col_bounds[rank][0]
    per_row = math.prod(shape[1:]) // shape[dim] * mine if shape[dim] else 0
    receive_counts = [n * per_row for n in row_counts]
    receive = torch.empty(sum(receive_counts), dtype=rows.dtype, device=rows.device)
    dist.all_to_all_single(receive, send, receive_counts, [p.numel() for p in parts], group=group)
    blocks = []
    for count, chunk in zip(row_counts, receive.split(receive_counts), strict=True):
        block_shape = list(shape)
        block_shape[0], block_shape[dim] = count, mine
        blocks.append(chunk.reshape(block_shape))
    return torch.cat(blocks, dim=0)


def load_shard(
    url: str | os.PathLike[str] | Checkpoint,
    rank: int,
    world: int,
    rules: Rules,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    filter: NameFilter = None,
    group=None,
    **open_kwargs: object,
) -> tuple[dict[str, torch.Tensor], StreamStats]:
    """This rank's tensors: slices for tensors a rule splits, whole tensors for the rest.

    Every rank must call it with the same arguments (but its own rank); with `group`
    (a torch.distributed process group of the `world` ranks) column splits travel
    once over the network and are exchanged between ranks.
    """
    checkpoint = url if isinstance(url, Checkpoint) else open(url, **open_kwargs)  # type: ignore[arg-type]
    try:
        lookup = rule_lookup(rules)
        keep = name_filter(filter)
        exchanged: dict[str, tuple[tuple[int, ...], int]] = {}

        def slices(name: str, shape: tuple[int, ...]) -> TensorSlice | None:
            dim = lookup(name)
            if dim is None:
                return None
            if group is not None and dim > 0 and len(shape) > dim:
                exchanged[name] = (shape, dim)
                return tp_slice(shape, 0, rank, world)  # disjoint rows; columns come from the exchange
            return tp_slice(shape, dim, rank, world)

        stream = checkpoint.stream(device=device, dtype=dtype, filter=keep, slices=slices)
        result: dict[str, torch.Tensor] = {}
        for name, tensor in stream:  # the same order on every rank: the exchanges pair up
            if name in exchanged:
                shape, dim = exchanged[name]
                tensor = _exchange(tensor, shape, dim, rank, world, group)
            result[name] = tensor
        return result, stream.stats
    finally:
        if not isinstance(url, Checkpoint):
            checkpoint.close()
