"""Hostile and broken safetensors files: every one is refused before any data is read, naming file and tensor."""

from __future__ import annotations

import json
import struct
import time

import pytest
import torch

import weightstream
from tests.conftest import run_cli
from tests.weightstream.conftest import random_tensor, write_checkpoint
from weightstream.errors import CheckpointFormatError, FetchError
from weightstream.format import MAX_HEADER_BYTES, parse_header
from weightstream.options import HEADER_PROBE_BYTES

FILE = "s3://bucket/m/model.safetensors"


def encode(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def good_entry(begin: int = 0, end: int = 16, shape=(4,), dtype="F32") -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


CASES = {
    "length beyond the object": (encode({"a": good_entry()}, b"\0" * 16, length=5000), "runs past the end"),
    "header over 100 MB": (encode(b"{}", length=MAX_HEADER_BYTES + 1), "exceeds the 100000000-byte limit"),
    "too small": (b"\x01\x00", "too small to be a safetensors file"),
    "empty": (b"", "too small to be a safetensors file"),
    "not an object": (encode(b"[1, 2, 3]"), "does not start with '{'"),
    "not JSON": (encode(b"{not json"), "not valid JSON"),
    "not UTF-8": (encode(b'{"\xff": 1}'), "not valid JSON"),
    "duplicate names": (encode(b'{"a": {}, "a": {}}'), "duplicate key"),
    "overlapping offsets": (
        encode({"a": good_entry(0, 16), "b": good_entry(8, 24)}, b"\0" * 24),
        "'b' at data_offsets [8, 24] overlaps tensor 'a'",
    ),
    "gap between tensors": (
        encode({"a": good_entry(0, 16), "b": good_entry(20, 36)}, b"\0" * 36),
        "gap of 4 bytes before tensor 'b'",
    ),
    "trailing bytes": (encode({"a": good_entry()}, b"\0" * 20), "trailing bytes"),
    "offsets past the data": (encode({"a": good_entry(0, 16)}, b"\0" * 8), "run past the 8-byte data section"),
    "shape/size mismatch": (
        encode({"w": good_entry(0, 16, shape=(3, 2))}, b"\0" * 16),
        "'w': shape [3, 2] of F32 needs 24 bytes",
    ),
    "unknown dtype": (encode({"q": good_entry(dtype="Q4_K")}, b"\0" * 16), "'q': unknown dtype 'Q4_K'"),
    "missing dtype": (encode({"q": {"shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16), "'q': missing or non-string dtype"),
    "negative shape": (encode({"s": good_entry(shape=(-4,))}, b"\0" * 16), "'s': shape must be a list of non-negative integers"),
    "boolean shape": (encode({"s": good_entry(shape=(True,))}, b"\0" * 16), "'s': shape must be a list"),
    "reversed offsets": (encode({"r": good_entry(16, 0)}, b"\0" * 16), "'r': data_offsets must be [begin, end]"),
    "three offsets": (encode({"r": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8, 16]}}, b"\0" * 16), "'r': data_offsets"),
    "entry not an object": (encode({"e": [1]}), "'e': entry is not a JSON object"),
    "metadata not strings": (encode({"__metadata__": {"k": 1}}), "__metadata__ must map strings to strings"),
    "metadata an empty list": (encode({"__metadata__": []}), "__metadata__ must map strings to strings"),
    "metadata false": (encode({"__metadata__": False}), "__metadata__ must map strings to strings"),
    "nested 200,000 levels deep": (encode(b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"), "nested too deeply"),
    "metadata nested 200,000 levels deep": (
        encode(b'{"__metadata__": ' + b'{"k": ' * 200_000 + b"1" + b"}" * 200_000 + b"}"),
        "nested too deeply",
    ),
    "shape overflowing int64": (
        encode({"o": good_entry(shape=(1 << 32, 1 << 32, 4))}, b"\0" * 16),
        "'o': shape [4294967296, 4294967296, 4] overflows a 64-bit element count",
    ),
    "dim beyond int64 in an empty shape": (
        encode({"o": good_entry(0, 0, shape=(1 << 64, 0))}),
        "'o': shape [18446744073709551616, 0] overflows",
    ),
    "200,000 huge dims": (
        encode({"o": good_entry(shape=[(1 << 63) - 1] * 200_000)}, b"\0" * 16),
        "'o': shape [9223372036854775807, ",
    ),
    "megabyte name": (encode({"n" * 1_000_000: good_entry(dtype="Q4_K")}, b"\0" * 16), "tensor 'nnnnnnnn"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_header_is_refused_with_file_and_tensor_named(case):
    data, message = CASES[case]
    started = time.monotonic()
    with pytest.raises(CheckpointFormatError) as error:
        parse_header(data, len(data), FILE)
    assert time.monotonic() - started < 5
    assert str(error.value).startswith(FILE + ": ")
    assert message in str(error.value)
    assert "\n" not in str(error.value) and len(str(error.value)) < 500  # one readable line, whatever the input


def test_valid_edge_cases_pass():
    entries = {"e": good_entry(0, 0, shape=(0, 5)), "a": good_entry(0, 16), "z": good_entry(16, 16, shape=(2, 0))}
    data = encode(entries, b"\0" * 16)
    header = parse_header(data, len(data), FILE)
    assert [t.name for t in header.tensors] == ["e", "a", "z"]
    assert header.data_start == 8 + len(json.dumps(entries))
    assert [(t.start - header.data_start, t.end - header.data_start) for t in header.tensors] == [(0, 0), (0, 16), (16, 16)]


@pytest.mark.parametrize(
    "case",
    [
        "length beyond the object",
        "header over 100 MB",
        "overlapping offsets",
        "shape/size mismatch",
        "unknown dtype",
        "empty",
        "nested 200,000 levels deep",
    ],
)
def test_hostile_objects_in_s3_are_refused_before_any_data_is_read(s3_prefix, fault_proxy, case):
    data, message = CASES[case]
    s3_prefix.put_bytes("model.safetensors", data)
    fault_proxy.requests = 0
    with pytest.raises(CheckpointFormatError) as error:
        weightstream.open(s3_prefix.url(endpoint=fault_proxy.endpoint))
    assert f"s3://{s3_prefix.bucket}/{s3_prefix.prefix}model.safetensors: " in str(error.value)
    assert message in str(error.value)
    # two HEADs (index? single file?), the header probe (and the rest of a header over 256 KiB): no data range
    assert fault_proxy.requests == 3 + (len(data) > HEADER_PROBE_BYTES)


def test_truncated_shard_and_broken_index_are_refused(tmp_path, s3_prefix):
    good = encode({"a": good_entry()}, b"\0" * 16)
    s3_prefix.put_bytes("model-1.safetensors", good[:-3])  # cut short after upload
    s3_prefix.put_bytes("model.safetensors.index.json", json.dumps({"weight_map": {"a": "model-1.safetensors"}}).encode())
    with pytest.raises(CheckpointFormatError, match=r"model-1\.safetensors: .*run past"):
        weightstream.open(s3_prefix.url())
    s3_prefix.put_bytes("model-1.safetensors", good)
    s3_prefix.put_bytes("model.safetensors.index.json", json.dumps({"weight_map": {"a": "../../etc/passwd"}}).encode())
    with pytest.raises(CheckpointFormatError, match="must be a relative path"):
        weightstream.open(s3_prefix.url())
    s3_prefix.put_bytes("model.safetensors.index.json", json.dumps({"weight_map": {"b": "model-1.safetensors"}}).encode())
    with pytest.raises(
        CheckpointFormatError, match=r"maps tensor 'b' to model-1\.safetensors, but that shard does not contain it"
    ):
        weightstream.open(s3_prefix.url())
    s3_prefix.put_bytes("model.safetensors.index.json", b"{}")
    with pytest.raises(CheckpointFormatError, match="weight_map"):
        weightstream.open(s3_prefix.url())
    twin = encode({"a": good_entry()}, b"\1" * 16)
    s3_prefix.put_bytes("model-2.safetensors", twin)
    s3_prefix.put_bytes(
        "model.safetensors.index.json",
        json.dumps({"weight_map": {"a": "model-1.safetensors", "x": "model-2.safetensors"}}).encode(),
    )
    with pytest.raises(CheckpointFormatError, match="tensor 'a' is in both"):
        weightstream.open(s3_prefix.url())


def test_object_replaced_by_a_shorter_one_after_open_fails_clearly(tmp_path, s3_prefix):
    generator = torch.Generator().manual_seed(70)
    write_checkpoint(tmp_path, {f"w{i}": random_tensor((100, 1000), torch.float32, generator) for i in range(4)})
    data = (tmp_path / "model.safetensors").read_bytes()
    s3_prefix.put_bytes("model.safetensors", data)
    with weightstream.open(s3_prefix.url(), range_size=256 * 1024, max_retries=1, backoff_base=0.01) as checkpoint:
        s3_prefix.put_bytes("model.safetensors", data[: len(data) // 2])  # replaced while the replica starts
        with pytest.raises(FetchError, match="shorter than its header says"):
            checkpoint.load()


def test_deeply_nested_header_is_one_line_from_the_cli(s3_prefix):
    data, _ = CASES["nested 200,000 levels deep"]
    s3_prefix.put_bytes("model.safetensors", data)
    done = run_cli("weights", "load", s3_prefix.url(), check=False, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    where = f"s3://{s3_prefix.bucket}/{s3_prefix.prefix}model.safetensors"
    assert done.stderr.startswith(f"liftoff: error: {where}: header JSON is nested too deeply"), done.stderr


def test_deeply_nested_index_and_manifest_are_format_errors(s3_prefix):
    good = encode({"a": good_entry()}, b"\0" * 16)
    s3_prefix.put_bytes("model-1.safetensors", good)
    s3_prefix.put_bytes("model.safetensors.index.json", b'{"weight_map": ' + b"[" * 200_000 + b"]" * 200_000 + b"}")
    with pytest.raises(CheckpointFormatError, match=r"model\.safetensors\.index\.json: .*nested too deeply"):
        weightstream.open(s3_prefix.url())
    s3_prefix.put_bytes("model.safetensors.index.json", json.dumps({"weight_map": {"a": "model-1.safetensors"}}).encode())
    s3_prefix.put_bytes("SHA256SUMS.json", b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}")
    with pytest.raises(CheckpointFormatError, match=r"SHA256SUMS\.json: .*nested too deeply"):
        weightstream.open(s3_prefix.url(), sha256="SHA256SUMS.json")
