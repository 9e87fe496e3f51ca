"""weightstream against a real S3 server (moto, server mode): every dtype, single and sharded, the API's options."""

from __future__ import annotations

import hashlib
import json
import uuid

import pytest
import torch
from safetensors.torch import load_file

import weightstream
from tests.weightstream.conftest import assert_same, every_dtype_tensors, random_tensor, write_checkpoint
from weightstream.errors import CheckpointNotFound, IntegrityError

SMALL = {"range_size": 64 * 1024, "concurrency": 4, "pool_bytes": 256 * 1024}


def test_single_file_every_dtype_equals_safetensors(tmp_path, s3_prefix):
    write_checkpoint(tmp_path, every_dtype_tensors(), metadata={"format": "pt", "note": "every dtype"})
    s3_prefix.upload(tmp_path)
    state = weightstream.load(s3_prefix.url(), range_size=64 * 1024, concurrency=4)
    assert_same(state, load_file(str(tmp_path / "model.safetensors")))
    with weightstream.open(s3_prefix.url()) as checkpoint:
        assert checkpoint.metadata == {"format": "pt", "note": "every dtype"}
        assert [f.name for f in checkpoint.files] == ["model.safetensors"]


def test_sharded_checkpoint_equals_safetensors(tmp_path, s3_prefix):
    tensors = every_dtype_tensors(seed=1)
    files = write_checkpoint(tmp_path, tensors, shards=3)
    s3_prefix.upload(tmp_path)
    expected = {}
    for name in files[:-1]:
        expected.update(load_file(str(tmp_path / name)))
    with weightstream.open(s3_prefix.url(), **SMALL) as checkpoint:
        assert [f.name for f in checkpoint.files] == files[:-1]
        state = checkpoint.load()
        assert checkpoint.last_stats.ranges > len(files)  # small ranges: tensors spread over several GETs
    assert_same(state, expected)
    # the index's URL names the same checkpoint
    assert_same(weightstream.load(s3_prefix.url("model.safetensors.index.json")), expected)


def test_big_tensors_split_over_many_ranges_and_connections(tmp_path, s3_prefix):
    generator = torch.Generator().manual_seed(2)
    tensors = {f"w{i}": random_tensor((1000 + i, 333), torch.float32, generator) for i in range(6)}
    write_checkpoint(tmp_path, tensors, shards=2)
    s3_prefix.upload(tmp_path)
    with weightstream.open(s3_prefix.url(), range_size=100_000, concurrency=8, pool_bytes=3_000_000) as checkpoint:
        stream = checkpoint.stream()
        state = dict(stream)
    assert_same(state, tensors)
    assert stream.stats.ranges >= sum(t.numel() * 4 for t in tensors.values()) // 100_000
    assert stream.stats.bytes_fetched == sum(t.numel() * 4 for t in tensors.values())


def test_iteration_is_in_file_order_with_bounded_memory(tmp_path, s3_prefix):
    generator = torch.Generator().manual_seed(3)
    tensors = {f"layer{i}.weight": random_tensor((64, 1024), torch.float32, generator) for i in range(12)}
    tensors["big"] = random_tensor((512, 1024), torch.float32, generator)  # 2 MiB: bigger than the whole pool
    write_checkpoint(tmp_path, tensors)
    s3_prefix.upload(tmp_path)
    pool = 600 * 1024
    with weightstream.open(s3_prefix.url(), range_size=128 * 1024, concurrency=4, pool_bytes=pool) as checkpoint:
        order = list(checkpoint.tensors)
        stream = checkpoint.stream()
        seen = []
        for name, tensor in stream:
            seen.append(name)
            assert as_list_equal(tensor, tensors[name]), name
    assert seen == order
    largest = max(t.numel() * 4 for t in tensors.values())
    assert 0 < stream.stats.peak_held <= pool + largest


def as_list_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_tensors_outlive_the_stream_and_own_their_memory(tmp_path, s3_prefix):
    generator = torch.Generator().manual_seed(4)
    tensors = {f"t{i}": random_tensor((300, 300), torch.float32, generator) for i in range(8)}
    write_checkpoint(tmp_path, tensors)
    s3_prefix.upload(tmp_path)
    kept = {}
    with weightstream.open(s3_prefix.url(), range_size=64 * 1024, concurrency=4, pool_bytes=400_000) as checkpoint:
        for name, tensor in checkpoint:
            kept[name] = tensor  # held across later reads: must not be overwritten by them
    assert_same(kept, tensors)
    pointers = {t.data_ptr() for t in kept.values()}
    assert len(pointers) == len(kept)


def test_filter_reads_only_selected_tensors(tmp_path, s3_prefix):
    generator = torch.Generator().manual_seed(5)
    tensors = {f"model.layers.{i}.w": random_tensor((256, 256), torch.float16, generator) for i in range(8)}
    write_checkpoint(tmp_path, tensors)
    s3_prefix.upload(tmp_path)
    with weightstream.open(s3_prefix.url(), coalesce_gap=0, range_size=64 * 1024) as checkpoint:
        stream = checkpoint.stream(filter="model.layers.[13].*")
        state = dict(stream)
        assert sorted(state) == ["model.layers.1.w", "model.layers.3.w"]
        assert stream.stats.bytes_fetched == 2 * 256 * 256 * 2
        assert sorted(checkpoint.load(filter={"model.layers.0.w"})) == ["model.layers.0.w"]
        assert sorted(checkpoint.load(filter=lambda n: n.endswith("7.w"))) == ["model.layers.7.w"]
    assert_same(state, {k: tensors[k] for k in state})


def test_dtype_converts_floating_point_only(tmp_path, s3_prefix):
    generator = torch.Generator().manual_seed(6)
    tensors = {"f": torch.randn(10, 10, generator=generator), "i": torch.arange(7), "b": torch.tensor([True, False])}
    write_checkpoint(tmp_path, tensors)
    s3_prefix.upload(tmp_path)
    state = weightstream.load(s3_prefix.url(), dtype=torch.bfloat16)
    assert state["f"].dtype == torch.bfloat16 and torch.equal(state["f"], tensors["f"].bfloat16())
    assert state["i"].dtype == torch.int64 and torch.equal(state["i"], tensors["i"])
    assert state["b"].dtype == torch.bool and torch.equal(state["b"], tensors["b"])


def test_file_urls_plain_paths_and_object_urls(tmp_path, s3_prefix):
    tensors = every_dtype_tensors(seed=7)
    write_checkpoint(tmp_path / "single", tensors)
    write_checkpoint(tmp_path / "sharded", tensors, shards=4)
    assert_same(weightstream.load(f"file://{tmp_path / 'single'}"), tensors)
    assert_same(weightstream.load(str(tmp_path / "sharded")), tensors)
    assert_same(weightstream.load(tmp_path / "single" / "model.safetensors"), tensors)
    assert_same(weightstream.load(f"file://{tmp_path / 'sharded' / 'model.safetensors.index.json'}", **SMALL), tensors)
    s3_prefix.upload(tmp_path / "single")
    assert_same(weightstream.load(s3_prefix.url("model.safetensors")), tensors)


def test_sha256_manifest_verified_and_mismatch_returns_nothing(tmp_path, s3_prefix):
    tensors = every_dtype_tensors(seed=8)
    files = write_checkpoint(tmp_path, tensors, shards=2)
    digests = {name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() for name in files[:-1]}
    (tmp_path / "SHA256SUMS").write_text("".join(f"{d}  {n}\n" for n, d in digests.items()))
    s3_prefix.upload(tmp_path)
    with weightstream.open(s3_prefix.url(), sha256="SHA256SUMS", **SMALL) as checkpoint:
        assert_same(checkpoint.load(), tensors)
        assert_same(dict(checkpoint), tensors)  # streaming verifies too
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    in_bad_shard = {name for name, file in weight_map.items() if file == files[1]}
    bad = {**digests, files[1]: "0" * 64}
    with weightstream.open(s3_prefix.url(), sha256=bad, **SMALL) as checkpoint:
        with pytest.raises(IntegrityError, match=files[1]) as error:
            checkpoint.load()
        assert "manifest" in str(error.value)
        delivered = []
        with pytest.raises(IntegrityError):
            for name, _ in checkpoint:
                delivered.append(name)
        assert delivered and not in_bad_shard & set(delivered)  # the good shard came out, nothing of the bad one
        with pytest.raises(ValueError, match="whole files"):
            checkpoint.stream(filter="u8.*")


def test_missing_checkpoint_and_missing_shard_are_named(tmp_path, s3_prefix):
    with pytest.raises(CheckpointNotFound, match="no safetensors checkpoint under s3://"):
        weightstream.open(s3_prefix.url())
    files = write_checkpoint(tmp_path, every_dtype_tensors(seed=9), shards=3)
    s3_prefix.upload(tmp_path, [files[0], files[2], "model.safetensors.index.json"])
    with pytest.raises(CheckpointNotFound, match=files[1]):
        weightstream.open(s3_prefix.url())
    with pytest.raises(CheckpointNotFound, match="does not exist"):
        weightstream.open(f"{tmp_path}/nothing-here")


def test_header_is_one_ranged_get_and_huge_headers_two(tmp_path, s3_prefix, fault_proxy):
    generator = torch.Generator().manual_seed(10)
    small = {f"t{i}": random_tensor((4, 4), torch.float32, generator) for i in range(5)}
    write_checkpoint(tmp_path / "small", small, shards=2)
    s3_prefix.upload(tmp_path / "small")
    fault_proxy.requests = 0
    with weightstream.open(s3_prefix.url(endpoint=fault_proxy.endpoint)) as checkpoint:
        header_gets = fault_proxy.requests - 2  # minus the listing and the index read (boto3)
        assert header_gets == 2  # one ranged GET per shard
        checkpoint.load()
    # a header bigger than the first read (256 KiB): a second ranged GET for the rest
    many = {f"a.very.long.tensor.name.to.make.the.header.big.{i:06d}": torch.zeros(1) for i in range(4000)}
    write_checkpoint(tmp_path / "big", many)
    assert (tmp_path / "big" / "model.safetensors").stat().st_size > 300_000
    s3_prefix.put_bytes("big.safetensors", (tmp_path / "big" / "model.safetensors").read_bytes())
    fault_proxy.requests = 0
    with weightstream.open(s3_prefix.url("big.safetensors", endpoint=fault_proxy.endpoint)) as checkpoint:
        assert fault_proxy.requests == 2  # no listing for an object URL: the probe and the rest of the header
        assert len(checkpoint.tensors) == 4000


def test_any_bucket_and_prefix_name_finds_a_single_file_checkpoint(tmp_path, s3_server):
    """Not-found is told by the S3 error code, never by words in the message (which quotes the URL)."""
    bucket = f"bucket-key-index-model-not-found-nosuchkey-{uuid.uuid4().hex[:8]}"
    s3_server.create_bucket(bucket)
    prefix = "bucket/NoSuchKey/NoSuchBucket/NotFound/404/not found/key/index/model/model.safetensors.index.json.d/"
    tensors = every_dtype_tensors(seed=12)
    write_checkpoint(tmp_path, tensors)
    s3_server.client().upload_file(str(tmp_path / "model.safetensors"), bucket, prefix + "model.safetensors")
    assert_same(weightstream.load(f"s3://{bucket}/{prefix}?path_style=true"), load_file(str(tmp_path / "model.safetensors")))
    with pytest.raises(CheckpointNotFound, match="no safetensors checkpoint under s3://"):
        weightstream.open(f"s3://{bucket}/{prefix}elsewhere/?path_style=true")
