"""`liftoff replicate`: copy what another region's store lacks, in the same write order."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from layerstore.catalog import find_image, image_records, iter_records, load_index
from layerstore.errors import ObjectNotFound
from layerstore.layout import chain_key, chunk_key, image_key, layer_index_key
from layerstore.leases import writing
from layerstore.progress import ProgressLine
from layerstore.records import ImageRecord, IndexRecord, parse_image_key_record
from layerstore.stores import Store, StoreChain


@dataclass
class ReplicateStats:
    images: int = 0
    layers_copied: int = 0
    layers_present: int = 0
    chunks_copied: int = 0
    chunks_present: int = 0
    bytes_copied: int = 0  # bytes moved through this machine (server-side copies count 0)


def replicate(
    source: Store, target: Store, names: list[str] | None, workers: int = 16, progress: bool | None = False
) -> ReplicateStats:
    """Copy images (all of them if `names` is None) from `source` to `target`; idempotent.

    Per image: missing chunks, then layer indexes, then chain records, then the
    image record, so the target never holds a record whose data is missing.
    `progress` (None: when stderr is a terminal) shows the images' uncompressed layer
    bytes done of their total, chunk by chunk.
    """
    chain = StoreChain([source])
    target.prepare_writes()
    everything = names is None
    roots = [digest for digest, _ in iter_records(chain)] if everything else [find_image(chain, n)[0] for n in names]
    plan = []
    for digest in roots:  # every record first: the total is known before the first copy
        key = image_key(digest)
        record_bytes = source.get(key)
        record = parse_image_key_record(record_bytes, key)
        plan.append((key, record_bytes, record, image_records(chain, record)))
    sizes = {layer.digest: layer.tar_size for *_, images in plan for image in images for layer in image.layers}
    stats = ReplicateStats()
    line = ProgressLine(sum(sizes.values()), f"replicate to {target.url}", enabled=progress)
    with (
        line,
        writing([target], f"liftoff replicate from {source.url}"),
        ThreadPoolExecutor(workers, thread_name_prefix="replicate") as pool,
    ):
        seen: set[str] = set()  # layers counted in the progress
        for key, record_bytes, record, images in plan:
            for image in images:
                _replicate_image(chain, source, target, image, pool, stats, line, seen)
            if isinstance(record, IndexRecord):
                target.sync()
                _copy_if_different(source, target, key, record_bytes)
            stats.images += 1
    return stats


def _replicate_image(chain, source: Store, target: Store, image: ImageRecord, pool, stats, line, seen) -> None:
    for layer in image.layers:
        first = layer.digest not in seen
        seen.add(layer.digest)
        index_key = layer_index_key(layer.digest)
        if target.size(index_key) is not None:
            stats.layers_present += 1
            if first:
                line.skip(layer.tar_size)
            continue
        index = load_index(chain, layer.digest)
        chunk_sizes = {chunk_key(c.sha256): c.size for c in index.chunks}
        keys = sorted(chunk_sizes)
        present = target.sizes(keys)
        missing = [k for k, size in present.items() if size is None]
        stats.chunks_present += len(keys) - len(missing)
        counted = sum(chunk_sizes[k] for k, size in present.items() if size is not None)
        line.skip(counted)

        for copied in pool.map(lambda k, sizes=chunk_sizes: _copy_chunk(source, target, k, line, sizes[k]), missing):
            stats.bytes_copied += copied
        stats.chunks_copied += len(missing)
        target.sync()
        source.copy_to(index_key, target)
        stats.layers_copied += 1
        if first:  # the tar's headers, and chunks a layer uses twice
            line.advance(max(0, layer.tar_size - counted - sum(chunk_sizes[k] for k in missing)))
    target.sync()
    for layer in image.layers:
        key = chain_key(layer.chain_id)
        _copy_if_different(source, target, key, source.get(key))
    target.sync()
    key = image_key(image.manifest_digest)
    _copy_if_different(source, target, key, source.get(key))


def _copy_chunk(source: Store, target: Store, key: str, line: ProgressLine, size: int) -> int:
    """Copy one chunk object; its uncompressed `size` counts toward the progress."""
    copied = source.copy_to(key, target)
    line.advance(size)
    return copied


def _copy_if_different(source: Store, target: Store, key: str, data: bytes) -> None:
    try:
        if target.get(key) == data:
            return
    except ObjectNotFound:
        pass
    target.put(key, data)
