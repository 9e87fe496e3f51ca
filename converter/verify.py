"""`liftoff verify`: every chunk exists and hashes to its name, every index parses,
and (with a source) every entry equals the original layer's, byte for byte."""

from __future__ import annotations

import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from converter.layer import LayerSpec
from converter.streams import READ_SIZE, HashingReader, decompressing_reader
from layerstore.catalog import ChunkReader, find_image, image_records, load_index
from layerstore.errors import LiftoffError
from layerstore.index import decompress_chunk, tar_name
from layerstore.layout import chain_key, chunk_key
from layerstore.oci.mediatypes import layer_compression
from layerstore.oci.source import ImageSource
from layerstore.pb.liftoff.index.v1 import index_pb2 as pb
from layerstore.records import ChainRecord
from layerstore.stores import StoreChain
from layerstore.tarstream import TarEntry, TarReader

Report = Callable[[str], None]


def verify_image(stores: StoreChain, name: str, source: ImageSource | None = None, report: Report = print) -> list[str]:
    """Check an image in the stores; returns the problems found (empty when all is well)."""
    digest, record = find_image(stores, name)
    problems: list[str] = []
    for image in image_records(stores, record):
        for i, layer in enumerate(image.layers):
            where = f"{image.manifest_digest} layer {i + 1}/{len(image.layers)} {layer.digest}"
            entries = 0
            try:
                index = load_index(stores, layer.digest)
                entries = len(index.entries)
                found = _check_chunks(stores, index, where)
                found += _check_chain(stores, layer.chain_id, layer.digest, where)
                if source is not None and not found:
                    found += _compare_source(stores, index, source, layer, where)
            except LiftoffError as e:
                found = [f"{where}: {e}"]
            problems += found
            status = f"ok      {where}: {entries} entries" if not found else f"FAILED  {where}: {len(found)} problem(s)"
            report(status)
    del digest
    return problems


def _check_chunks(stores: StoreChain, index: pb.LayerIndex, where: str) -> list[str]:
    def check(chunk: pb.Chunk) -> str | None:
        key = chunk_key(chunk.sha256)
        try:
            decompress_chunk(stores.get(key), chunk.sha256, chunk.size, key)
        except LiftoffError as e:
            return f"{where}: {e}"
        return None

    with ThreadPoolExecutor(16) as pool:
        return [p for p in pool.map(check, index.chunks) if p]


def _check_chain(stores: StoreChain, chain_id: str, layer_digest: str, where: str) -> list[str]:
    try:
        record = ChainRecord.from_json(stores.get(chain_key(chain_id)), chain_key(chain_id))
    except LiftoffError as e:
        return [f"{where}: chain record {chain_id}: {e}"]
    if record.layer_digest != layer_digest:
        # Another blob with the same content (e.g. other compression) may own the chain: fine if converted.
        try:
            load_index(stores, record.layer_digest)
        except LiftoffError as e:
            return [f"{where}: chain {chain_id} names layer {record.layer_digest}, which is unusable: {e}"]
    return []


_FIELDS = ("type", "mode", "uid", "gid", "uname", "gname", "size", "mtime_ns", "link_target", "dev_major", "dev_minor")


def _compare_source(stores: StoreChain, index: pb.LayerIndex, source: ImageSource, layer, where: str) -> list[str]:
    spec = LayerSpec(layer.digest, layer.size, layer.media_type, layer.diff_id)
    chunk = ChunkReader(stores, index, keep=64)
    problems: list[str] = []
    with source.open_blob(spec.digest) as blob:
        compressed = HashingReader(blob)
        tar = TarReader(io.BufferedReader(decompressing_reader(compressed, layer_compression(spec.media_type)), READ_SIZE))
        entries = iter(index.entries)
        for original in tar:
            stored = next(entries, None)
            if stored is None:
                problems.append(f"{where}: index lacks entry {original.path!r}")
                break
            problems += _compare_entry(original, stored, tar, chunk, where)
            if len(problems) > 20:
                break
        else:
            extra = next(entries, None)
            if extra is not None:
                problems.append(f"{where}: index has an extra entry {tar_name(extra)!r}")
    if not problems and compressed.digest != spec.digest:
        problems.append(f"{where}: the source blob now hashes to {compressed.digest}")
    return problems


def _compare_entry(original: TarEntry, stored: pb.Entry, tar: TarReader, chunk, where: str) -> list[str]:
    name = original.path.decode("utf-8", "backslashreplace")
    problems = []
    if original.path != stored.path:
        return [f"{where}: entry order differs at {name!r} (index has {stored.path!r})"]
    for attr in _FIELDS:
        if getattr(original, attr) != getattr(stored, attr):
            problems.append(f"{where}: {name!r}: {attr} is {getattr(stored, attr)!r}, source has {getattr(original, attr)!r}")
    if dict(stored.xattrs) != original.xattrs:
        problems.append(f"{where}: {name!r}: xattrs differ")
    if original.type == pb.ENTRY_TYPE_REGULAR and not problems:
        buffer = bytearray(READ_SIZE)
        pieces = (memoryview(chunk(e.chunk))[e.offset : e.offset + e.length] for e in stored.extents)
        pending = memoryview(b"")
        while True:
            n = tar.readinto(memoryview(buffer))
            if not n:
                break
            got = memoryview(buffer)[:n]
            while got:
                if not pending:
                    pending = next(pieces, memoryview(b""))
                    if not pending:
                        return [f"{where}: {name!r}: index content is shorter than the source"]
                k = min(len(got), len(pending))
                if got[:k] != pending[:k]:
                    return [f"{where}: {name!r}: content differs from the source"]
                got, pending = got[k:], pending[k:]
        if pending or next(pieces, None) is not None:
            problems.append(f"{where}: {name!r}: index content is longer than the source")
    return problems
