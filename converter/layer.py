"""Convert one OCI layer blob: stream, decompress, parse tar, chunk, upload, build its index."""

from __future__ import annotations

import io
import zlib
from concurrent.futures import Future
from dataclasses import dataclass
from typing import BinaryIO

import urllib3
import zstandard

from converter.streams import READ_SIZE, HashingReader, decompressing_reader
from converter.upload import ChunkInfo, ChunkUploader
from layerstore import CONVERTER
from layerstore.chunker import Chunker
from layerstore.errors import ImageError, RegistryError
from layerstore.index import FORMAT_MAJOR, FORMAT_MINOR
from layerstore.oci.mediatypes import layer_compression
from layerstore.pb.liftoff.index.v1 import index_pb2 as pb
from layerstore.tarstream import TarEntry, TarReader


@dataclass(frozen=True)
class ConvertedLayer:
    """A layer's index and what converting it cost."""

    index: pb.LayerIndex
    chunks_new: int
    bytes_uploaded: int


@dataclass(frozen=True)
class LayerSpec:
    """A layer as the manifest and config describe it."""

    digest: str
    size: int
    media_type: str
    diff_id: str


def convert_layer(
    spec: LayerSpec,
    blob: BinaryIO,
    uploader: ChunkUploader,
    chunk_size: int,
) -> ConvertedLayer:
    """Stream one layer blob into chunks in the stores and return its index.

    The blob's digest and size and the tar's diffID are checked against the
    manifest and config after the whole stream has been read; the caller
    writes the index only if this returns. Raises ImageError naming the cause.
    """
    compression = layer_compression(spec.media_type)
    compressed = HashingReader(blob)
    tar_stream = HashingReader(decompressing_reader(compressed, compression))
    reader = TarReader(io.BufferedReader(tar_stream, READ_SIZE))
    futures: dict[int, Future[ChunkInfo]] = {}
    chunker = Chunker(chunk_size, lambda number, data: futures.__setitem__(number, uploader.submit(data)))
    entries: list[tuple[TarEntry, list[tuple[int, int, int]]]] = []
    try:
        try:
            for entry in reader:
                extents = chunker.add_file(entry.size, reader.readinto) if entry.type == pb.ENTRY_TYPE_REGULAR else []
                entries.append((entry, extents))
            chunker.flush()
            compressed.drain()
        except urllib3.exceptions.HTTPError as e:
            raise RegistryError(f"reading the blob failed: {e}; re-run to resume") from None
        except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
            raise ImageError(f"corrupt or truncated {compression} stream ({_describe(e)})") from None
    except BaseException:
        _wait(futures, raise_error=False)
        raise
    infos = _wait(futures)
    if compressed.count != spec.size:
        raise ImageError(f"blob is {compressed.count} bytes, the manifest says {spec.size}: truncated or wrong blob")
    if compressed.digest != spec.digest:
        raise ImageError(f"blob digest mismatch (got {compressed.digest}): the source served a corrupt or different blob")
    if tar_stream.digest != spec.diff_id:
        raise ImageError(f"uncompressed digest {tar_stream.digest} does not match the config's diff_id {spec.diff_id}")
    index = _build_index(spec, compressed.count, tar_stream.count, chunk_size, entries, infos)
    return ConvertedLayer(index, sum(1 for i in infos if i.uploaded), sum(i.uploaded for i in infos))


def _wait(futures: dict[int, Future[ChunkInfo]], raise_error: bool = True) -> list[ChunkInfo]:
    """Results in chunk-number order; the first upload error is raised after all have settled."""
    results, error = [], None
    for number in sorted(futures):
        try:
            results.append(futures[number].result())
        except BaseException as e:  # keep waiting so no worker outlives the layer
            error = error or e
    if error is not None and raise_error:
        raise error
    return results


def _build_index(
    spec: LayerSpec,
    blob_size: int,
    tar_size: int,
    chunk_size: int,
    entries: list[tuple[TarEntry, list[tuple[int, int, int]]]],
    infos: list[ChunkInfo],
) -> pb.LayerIndex:
    index = pb.LayerIndex(
        format_major=FORMAT_MAJOR,
        format_minor=FORMAT_MINOR,
        layer_digest=spec.digest,
        diff_id=spec.diff_id,
        media_type=spec.media_type,
        layer_size=blob_size,
        tar_size=tar_size,
        chunk_size=chunk_size,
        converter=CONVERTER,
    )
    table: dict[bytes, int] = {}
    renumber = []
    for info in infos:  # identical chunks within the layer share one table slot
        slot = table.get(info.sha256)
        if slot is None:
            slot = table[info.sha256] = len(index.chunks)
            index.chunks.add(sha256=info.sha256, size=info.size, stored_size=info.stored_size)
        renumber.append(slot)
    add = index.entries.add
    for e, extents in entries:
        item = add(
            path=e.path,
            type=e.type,
            mode=e.mode,
            uid=e.uid,
            gid=e.gid,
            uname=e.uname,
            gname=e.gname,
            size=e.size,
            mtime_ns=e.mtime_ns,
            link_target=e.link_target,
            dev_major=e.dev_major,
            dev_minor=e.dev_minor,
        )
        if e.xattrs:
            item.xattrs.update(e.xattrs)
        for number, offset, length in extents:
            item.extents.add(chunk=renumber[number], offset=offset, length=length)
    return index


def _describe(error: BaseException) -> str:
    if isinstance(error, EOFError):
        return "the stream ended early"
    return str(error) or type(error).__name__
