"""Layer indexes: (de)serialization, format versions, and reading files back from chunks."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import zstandard

from layerstore.errors import FormatError
from layerstore.pb.liftoff.index.v1 import index_pb2 as pb

FORMAT_MAJOR = 1
FORMAT_MINOR = 0
MAX_INDEX_BYTES = 1 << 30  # uncompressed; a sanity bound against decompression bombs

LayerIndex = pb.LayerIndex
Entry = pb.Entry


def encode_index(index: pb.LayerIndex, level: int = 9) -> bytes:
    """Serialize deterministically and zstd-compress: the bytes stored at layers/.../index."""
    raw = index.SerializeToString(deterministic=True)
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(raw)


REMEDY = "re-run liftoff convert for this image"


def decode_index(data: bytes, where: str = "index", check_extents: bool = True, remedy: str = REMEDY) -> pb.LayerIndex:
    """Parse stored index bytes; FormatError if truncated, corrupt or of an unknown major version.

    `check_extents` also checks that every extent lies inside its chunk (a pass over every entry):
    whoever serves file data from the index must; a caller that only needs its metadata may skip it.
    `remedy` ends the message of a corrupt index (a local copy's cure is not a new conversion).
    """
    tail = f"; {remedy}" if remedy else ""
    try:
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=MAX_INDEX_BYTES)
    except zstandard.ZstdError as e:
        raise FormatError(f"{where}: corrupt or truncated index ({e}){tail}") from None
    index = pb.LayerIndex()
    try:
        index.ParseFromString(raw)
    except Exception as e:  # protobuf raises DecodeError, a plain Exception subclass
        raise FormatError(f"{where}: index does not parse ({e}){tail}") from None
    if index.format_major != FORMAT_MAJOR:
        raise FormatError(
            f"{where}: index format {index.format_major}.{index.format_minor} is not supported by this "
            f"liftoff (reads {FORMAT_MAJOR}.x); upgrade liftoff, or use an ordinary pull"
        )
    sizes = [chunk.size for chunk in index.chunks] if check_extents else []  # (index fields are slow to reach)
    for entry in index.entries if check_extents else ():
        for extent in entry.extents:
            chunk = extent.chunk
            if chunk >= len(sizes) or extent.offset + extent.length > sizes[chunk]:
                raise FormatError(f"{where}: entry {entry.path!r} points outside its chunks; the index is corrupt")
    return index


def decompress_chunk(data: bytes, sha256: bytes, size: int, where: str) -> bytes:
    """Decompress a stored chunk and check it against its name; FormatError if it does not match."""
    try:
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=max(size, 1))
    except zstandard.ZstdError as e:
        raise FormatError(f"chunk {sha256.hex()} from {where} is corrupt ({e})") from None
    if len(raw) != size or hashlib.sha256(raw).digest() != sha256:
        raise FormatError(f"chunk {sha256.hex()} from {where} does not match its digest: refusing corrupt data")
    return raw


def file_contents(index: pb.LayerIndex, entry: pb.Entry, chunk: Callable[[int], bytes]) -> Iterator[memoryview]:
    """The pieces of a regular file's content, given `chunk(i)` -> uncompressed chunk i."""
    for extent in entry.extents:
        data = memoryview(chunk(extent.chunk))
        yield data[extent.offset : extent.offset + extent.length]


def tar_name(entry: pb.Entry) -> bytes:
    """The name the entry had in its tar: whiteouts and opaque markers get their ".wh." names back."""
    if entry.type == pb.ENTRY_TYPE_OPAQUE:
        return entry.path + b"/.wh..wh..opq" if entry.path else b".wh..wh..opq"
    if entry.type == pb.ENTRY_TYPE_WHITEOUT:
        parent, _, base = entry.path.rpartition(b"/")
        return (parent + b"/" if parent else b"") + b".wh." + base
    return entry.path
