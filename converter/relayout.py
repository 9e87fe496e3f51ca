"""Profile-guided layout: put the bytes a start reads into chunks of their own.

Chunks are cut at convert time without knowing what a start will read, so a start that
touches a few KiB of a large library, or one small file of a packed chunk, fetches whole
chunks it mostly does not need. Once a profile has recorded the byte ranges a real start
read, each layer's index is rewritten so those ranges ("hot" segments) live in new chunks
packed in first-access order, and everything else keeps pointing at the original chunks.
The profile then lists just the hot chunks: a start fetches little more than it reads.

Writes follow the store's order: hot chunks first (in every store), then the new indexes
(atomic replace), then the image record with the new profile. A reader holding an old
index still works (old chunks are never deleted); the layer's content is unchanged.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future

from converter.upload import ChunkInfo, ChunkUploader
from layerstore.catalog import ChunkReader, load_index
from layerstore.errors import FormatError
from layerstore.index import encode_index
from layerstore.layout import layer_index_key
from layerstore.leases import writing
from layerstore.pb.liftoff.index.v1 import index_pb2 as pb
from layerstore.records import ImageRecord
from layerstore.stores import Store, StoreChain

log = logging.getLogger(__name__)
ALIGN = 4096  # hot segments are widened to page boundaries: the kernel reads whole pages


def _slice(extents, start: int, end: int) -> list[tuple[int, int, int]]:
    """The (chunk, offset, length) pieces of [start, end) of a file laid out as `extents`."""
    out, position = [], 0
    for extent in extents:
        a, b = max(start, position), min(end, position + extent.length)
        if a < b:
            out.append((extent.chunk, extent.offset + a - position, b - a))
        position += extent.length
        if position >= end:
            break
    return out


def _hot_spans(ranges: list[list[int]], size: int) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for start, end in ranges:
        start, end = max(0, start - start % ALIGN), min(size, end + (-end % ALIGN))
        if spans and start <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], end))
        elif start < end:
            spans.append((start, end))
    return spans


def relayout_layer(
    stores: list[Store], index: pb.LayerIndex, files: list[tuple[bytes, list[list[int]]]], uploader: ChunkUploader
) -> list[ChunkInfo]:
    """Rewrite `index` in place so the files' hot ranges (in the given order) live in new packed
    chunks; uploads those chunks and returns them in order. The index is not written here."""
    chunk_size = index.chunk_size or (1 << 20)
    entries = {e.path: e for e in index.entries if e.type == pb.ENTRY_TYPE_REGULAR}
    read = ChunkReader(StoreChain(stores), index)
    futures: list[Future[ChunkInfo]] = []
    pack = bytearray()
    plans: dict[bytes, list[tuple[bool, int, int, int]]] = {}  # path -> (hot?, chunk or hot number, offset, length)

    def flush() -> None:
        nonlocal pack
        if pack:
            futures.append(uploader.submit(memoryview(pack)))
            pack = bytearray()

    for path, ranges in files:
        entry = entries.get(path)
        if entry is None or path in plans:
            continue
        plan, position = [], 0
        for start, end in [*_hot_spans(ranges, entry.size), (entry.size, entry.size)]:
            plan += [(False, c, o, n) for c, o, n in _slice(entry.extents, position, start)]  # cold: as before
            while start < end:
                room = chunk_size - len(pack)
                if room == 0:
                    flush()
                    room = chunk_size
                take = min(room, end - start)
                offset = len(pack)
                for c, o, n in _slice(entry.extents, start, start + take):
                    pack += read(c)[o : o + n]
                plan.append((True, len(futures), offset, take))
                start += take
            position = max(position, end)
        plans[path] = plan
    flush()
    infos = [f.result() for f in futures]
    slots: dict[bytes, int] = {chunk.sha256: i for i, chunk in enumerate(index.chunks)}
    hot_slot = []
    for info in infos:
        slot = slots.get(info.sha256)
        if slot is None:
            slot = slots[info.sha256] = len(index.chunks)
            index.chunks.add(sha256=info.sha256, size=info.size, stored_size=info.stored_size)
        hot_slot.append(slot)
    for path, plan in plans.items():
        entry = entries[path]
        del entry.extents[:]
        for hot, number, offset, length in plan:
            entry.extents.add(chunk=hot_slot[number] if hot else number, offset=offset, length=length)
        if sum(e.length for e in entry.extents) != entry.size:
            raise FormatError(f"relayout of {path!r} lost bytes: refusing to write the index")
    return infos


def relayout_image(stores: list[Store], record: ImageRecord, trace: dict, level: int = 3) -> list[dict]:
    """Rewrite the image's layer indexes around the trace's read ranges; returns the new profile chunks."""
    by_layer: dict[str, list[tuple[bytes, list[list[int]]]]] = {}
    for item in trace.get("ranges", []):
        by_layer.setdefault(item["layer"], []).append((bytes.fromhex(item["path"]), item["ranges"]))
    chain = StoreChain(stores)
    with writing(stores, f"liftoff profile {record.manifest_digest} (relayout)"):
        return _relayout(chain, stores, record, by_layer, level)


def _relayout(chain: StoreChain, stores: list[Store], record: ImageRecord, by_layer: dict, level: int) -> list[dict]:
    uploader = ChunkUploader(stores, workers=8, level=level)
    profile: list[dict] = []
    try:
        for layer in record.layers:
            files = by_layer.get(layer.digest)
            if not files:
                continue
            index = load_index(chain, layer.digest)
            infos = relayout_layer(stores, index, files, uploader)
            data = encode_index(index)
            for store in stores:
                store.sync()  # the hot chunks are durable before the index that names them
                store.put(layer_index_key(layer.digest), data)
            seen = set()
            for info in infos:
                if info.sha256 not in seen:
                    seen.add(info.sha256)
                    profile.append(
                        {"layer": layer.digest, "sha256": info.sha256.hex(), "size": info.size, "stored": info.stored_size}
                    )
            log.info("layer %s: %d hot chunks for %d files", layer.digest, len(seen), len(files))
    finally:
        uploader.close()
    for store in stores:
        store.sync()
    return profile
