"""Tensor-parallel helpers: each rank reads its slice; TP=N reads the checkpoint once in total."""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch

import weightstream
from tests.weightstream.conftest import random_tensor, write_checkpoint
from weightstream.tp import load_shard, split_bounds, tp_slice, tp_slices


def test_split_bounds_cover_the_dimension_evenly():
    assert [split_bounds(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert [split_bounds(2, r, 4) for r in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]
    with pytest.raises(ValueError):
        split_bounds(10, 4, 4)
    with pytest.raises(ValueError, match="dimension 2"):
        tp_slice((3, 4), 2, 0, 2)


@pytest.fixture
def tp_checkpoint(tmp_path):
    generator = torch.Generator().manual_seed(30)
    tensors = {
        "layer.qkv.weight": random_tensor((768, 256), torch.bfloat16, generator),  # split on rows
        "layer.o.weight": random_tensor((256, 768), torch.bfloat16, generator),  # split on columns, narrow pieces
        "layer.experts.weight": random_tensor((4, 1024, 256), torch.float32, generator),  # split on dim 1, big pieces
        "layer.norm.weight": random_tensor((256,), torch.float32, generator),  # replicated
    }
    write_checkpoint(tmp_path, tensors, shards=2)
    return tmp_path, tensors


RULES = {"*.qkv.weight": 0, "*.o.weight": 1, "*.experts.weight": 1}


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_gets_its_slices_and_row_slices_read_only_their_bytes(tp_checkpoint, s3_prefix, world):
    directory, tensors = tp_checkpoint
    s3_prefix.upload(directory)
    with weightstream.open(s3_prefix.url(), coalesce_gap=0, range_size=64 * 1024) as checkpoint:
        for rank in range(world):
            state, stats = load_shard(checkpoint, rank, world, RULES)
            for name, full in tensors.items():
                dim = next((d for p, d in RULES.items() if name.endswith(p[1:])), None)
                want = full if dim is None else full.narrow(dim, *_start_len(full.shape[dim], rank, world))
                assert torch.equal(state[name].view(torch.uint8), want.contiguous().view(torch.uint8)), (name, rank)
            # rows: exactly the slice; experts: exactly the slice (big pieces); o: whole (narrow pieces); norm: whole
            qkv = tensors["layer.qkv.weight"]
            expected = (
                _start_len(768, rank, world)[1] * 256 * 2
                + 4 * _start_len(1024, rank, world)[1] * 256 * 4
                + tensors["layer.o.weight"].numel() * 2
                + 256 * 4
            )
            assert stats.bytes_fetched == expected
            assert stats.bytes_fetched < sum(t.numel() * t.element_size() for t in tensors.values())
            del qkv


def _start_len(size: int, rank: int, world: int) -> tuple[int, int]:
    start, stop = split_bounds(size, rank, world)
    return start, stop - start


def test_slices_through_the_stream_api(tp_checkpoint):
    directory, tensors = tp_checkpoint
    with weightstream.open(directory) as checkpoint:
        state = checkpoint.load(slices=tp_slices({"*.qkv.weight": 0}, 1, 2), filter="*.qkv.weight")
    assert torch.equal(state["layer.qkv.weight"].view(torch.uint8), tensors["layer.qkv.weight"][384:].view(torch.uint8))


def _rank_main(rank: int, world: int, directory: str, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        state, stats = load_shard(
            directory, rank, world, RULES, group=dist.group.WORLD, filter=lambda n: "norm" not in n, coalesce_gap=0
        )
        torch.save({"state": state, "fetched": stats.bytes_fetched}, out)
    finally:
        dist.destroy_process_group()


def test_column_slices_are_exchanged_so_the_checkpoint_is_read_once(tp_checkpoint, tmp_path):
    directory, tensors = tp_checkpoint
    world = 2
    context = multiprocessing.get_context("spawn")
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(world)]
    processes = [
        context.Process(target=_rank_main, args=(r, world, str(directory), str(tmp_path / "init"), outs[r])) for r in range(world)
    ]
    for p in processes:
        p.start()
    for p in processes:
        p.join(120)
        assert p.exitcode == 0
    results = [torch.load(out) for out in outs]
    sharded = {k: v for k, v in tensors.items() if "norm" not in k}
    assert sum(r["fetched"] for r in results) == sum(t.numel() * t.element_size() for t in sharded.values())
    for rank, result in enumerate(results):
        for name, full in sharded.items():
            dim = RULES["*" + name[len("layer") :]]
            want = full.narrow(dim, *_start_len(full.shape[dim], rank, world))
            assert torch.equal(result["state"][name].view(torch.uint8), want.contiguous().view(torch.uint8)), (name, rank)
    assert not os.path.exists(tmp_path / "stray")
