"""Cache retention: when remote layers are removed, drop the cached chunks no remaining layer
references and the local indexes of the removed layers."""

from __future__ import annotations

import logging

from layerstore.cache import ChunkCache
from snapshotter.fuse_passthrough import BackingFiles
from snapshotter.fused.indexes import IndexDir

log = logging.getLogger(__name__)


def retain(indexes: IndexDir, cache: ChunkCache, layers: list[str], backing: BackingFiles | None = None) -> int:
    """Keep the chunks, indexes and backing files of `layers` only; returns how many cached chunks were dropped."""
    keep: set[bytes] = set()
    for digest in layers:
        if indexes.has(digest):
            keep.update(chunk.sha256 for chunk in indexes.load(digest).chunks)
    removed = cache.retain(keep)
    if backing is not None:
        backing.retain(set(layers))
    wanted = set(layers)
    for digest in indexes.digests():
        if digest not in wanted:
            indexes.remove(digest)
    if removed:
        log.info("released %d cached chunks of removed layers", removed)
    return removed
