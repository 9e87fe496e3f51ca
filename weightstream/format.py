"""The safetensors format: dtypes, header parsing and validation (no I/O here).

A file is an 8-byte little-endian header length N, N bytes of JSON, then the
data. Each tensor's `data_offsets` are relative to the data start. Every check
the loader relies on happens here, before a byte of data is fetched.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import torch

from weightstream.errors import CheckpointFormatError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
PREFIX_BYTES = 8
MAX_DIM = (1 << 63) - 1  # torch sizes are int64; the product of a shape's non-zero dims must fit too
_SHOWN = 200  # characters of a hostile value quoted in a message

# safetensors dtype code -> torch dtype: the set safetensors.torch maps (those torch supports).
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a file: where its bytes are (absolute offsets in the object) and what they are."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in the object
    end: int  # absolute offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class Header:
    """A validated header: tensors in file order, metadata, and the raw header bytes (for sha256)."""

    file: str
    size: int  # the object's size in bytes
    data_start: int
    tensors: list[TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    raw: bytes = b""

    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}


def _fail(file: str, message: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{file}: {message}")


def _cut(text: str) -> str:
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def _short(value: object) -> str:
    """repr(value), cut to a readable length (names and shapes in a hostile header can be megabytes)."""
    return _cut(repr(value) if not isinstance(value, list) or len(value) <= _SHOWN else repr(value[:20])[:-1] + ", ...]")


def _numel(shape: list[int]) -> int | None:
    """The element count, or None when the non-zero dims multiply past int64 (stops as soon as they do)."""
    product, empty = 1, False
    for dim in shape:
        if dim == 0:
            empty = True
        elif dim > MAX_DIM or product * dim > MAX_DIM:
            return None
        else:
            product *= dim
    return 0 if empty else product


def header_length(prefix: bytes, object_size: int, file: str) -> int:
    """The JSON header's length from the first 8 bytes, checked against the object's size."""
    if object_size < PREFIX_BYTES or len(prefix) < PREFIX_BYTES:
        raise _fail(file, f"is {object_size} bytes, too small to be a safetensors file (8-byte header length missing)")
    (n,) = struct.unpack("<Q", prefix[:PREFIX_BYTES])
    if n > MAX_HEADER_BYTES:
        raise _fail(file, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit: not a safetensors file, or corrupt")
    if n < 2:
        raise _fail(file, f"header length {n} is too small to hold a JSON object: corrupt file")
    if PREFIX_BYTES + n > object_size:
        raise _fail(
            file, f"header length {n} runs past the end of the {object_size}-byte object: the file is truncated or corrupt"
        )
    return n


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _int_list(value: object, length: int | None = None) -> list[int] | None:
    if not isinstance(value, list) or (length is not None and len(value) != length):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return None
    return value


def parse_header(raw: bytes, object_size: int, file: str) -> Header:
    """Parse and validate a whole header: `raw` is the 8-byte prefix plus the JSON (at least)."""
    n = header_length(raw, object_size, file)
    if len(raw) < PREFIX_BYTES + n:
        raise _fail(file, f"header read short: got {len(raw) - PREFIX_BYTES} of {n} bytes")
    text = raw[PREFIX_BYTES : PREFIX_BYTES + n]
    if not text.startswith(b"{"):
        raise _fail(file, "header does not start with '{': not a safetensors file")
    try:
        doc = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise _fail(file, f"header is not valid JSON ({_cut(str(e))}): corrupt file") from None
    except RecursionError:
        raise _fail(
            file, "header JSON is nested too deeply (a safetensors header is 3 levels deep): corrupt or hostile file"
        ) from None
    if not isinstance(doc, dict):
        raise _fail(file, "header is not a JSON object")
    data_start = PREFIX_BYTES + n
    data_size = object_size - data_start
    metadata = doc.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _fail(file, "__metadata__ must map strings to strings")
    tensors: list[TensorInfo] = []
    for name, entry in doc.items():
        where = f"tensor {_short(name)}"
        if not isinstance(entry, dict):
            raise _fail(file, f"{where}: entry is not a JSON object")
        dtype = entry.get("dtype")
        if not isinstance(dtype, str):
            raise _fail(file, f"{where}: missing or non-string dtype")
        if dtype not in DTYPES:
            raise _fail(file, f"{where}: unknown dtype {_short(dtype)} (supported: {', '.join(DTYPES)})")
        shape = _int_list(entry.get("shape"))
        if shape is None:
            raise _fail(file, f"{where}: shape must be a list of non-negative integers, got {_short(entry.get('shape'))}")
        offsets = _int_list(entry.get("data_offsets"), 2)
        if offsets is None or offsets[0] > offsets[1]:
            raise _fail(
                file,
                f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {_short(entry.get('data_offsets'))}",
            )
        begin, end = offsets
        if end > data_size:
            raise _fail(file, f"{where}: data_offsets {_short(offsets)} run past the {data_size}-byte data section")
        numel = _numel(shape)
        if numel is None:
            raise _fail(file, f"{where}: shape {_short(shape)} overflows a 64-bit element count: corrupt or hostile file")
        expected = numel * DTYPES[dtype].itemsize
        if end - begin != expected:
            raise _fail(
                file,
                f"{where}: shape {_short(shape)} of {dtype} needs {expected} bytes but data_offsets {offsets} hold {end - begin}",
            )
        tensors.append(TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end))
    tensors.sort(key=lambda t: (t.start, t.end))
    cursor = data_start
    previous = None
    for t in tensors:
        if t.start < cursor:
            raise _fail(
                file,
                f"tensor {_short(t.name)} at data_offsets [{t.start - data_start}, {t.end - data_start}] "
                f"overlaps tensor {_short(previous)}",
            )
        if t.start > cursor:
            raise _fail(
                file, f"gap of {t.start - cursor} bytes before tensor {_short(t.name)}: the data section has unaccounted bytes"
            )
        cursor = t.end
        if t.nbytes:
            previous = t.name
    if cursor != object_size:
        raise _fail(
            file,
            f"tensors end at byte {cursor} but the object is {object_size} bytes: "
            + ("trailing bytes after the last tensor" if cursor < object_size else "truncated"),
        )
    return Header(file, object_size, data_start, tensors, dict(metadata), bytes(raw[:data_start]))
