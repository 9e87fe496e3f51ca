"""Read-only views of a store: `liftoff ls` and `liftoff inspect`."""

from __future__ import annotations

from dataclasses import dataclass

from layerstore.catalog import Record, find_image, image_records, iter_records, load_index
from layerstore.oci.platform import platform_text
from layerstore.pb.liftoff.index.v1 import index_pb2 as pb
from layerstore.records import ImageRecord, IndexRecord
from layerstore.stores import StoreChain


def list_images(stores: StoreChain) -> list[dict]:
    """One row per record: digest, kind, references, platform(s), layers, bytes."""
    rows = []
    for digest, record in iter_records(stores):
        if isinstance(record, IndexRecord):
            platforms = [platform_text(m.get("platform") or {}) for m in record.manifests]
            rows.append(
                {
                    "digest": digest,
                    "kind": "index",
                    "references": record.references,
                    "platforms": platforms,
                    "converted_at": record.converted_at,
                }
            )
        else:
            rows.append(
                {
                    "digest": digest,
                    "kind": "image",
                    "references": record.references,
                    "platforms": [platform_text(record.platform)],
                    "layers": len(record.layers),
                    "tar_bytes": sum(layer.tar_size for layer in record.layers),
                    "files": sum(layer.files for layer in record.layers),
                    "profile": bool(record.profile),
                    "converted_at": record.converted_at,
                }
            )
    return rows


@dataclass
class LayerStats:
    digest: str
    chain_id: str
    entries: int
    files: int
    dirs: int
    symlinks: int
    whiteouts: int
    file_bytes: int
    chunks: int
    chunk_bytes: int
    stored_bytes: int


def layer_stats(index: pb.LayerIndex, chain_id: str) -> LayerStats:
    """Counts and sizes of one layer index."""
    counts = {t: 0 for t in pb.EntryType.values()}
    file_bytes = 0
    for entry in index.entries:
        counts[entry.type] += 1
        file_bytes += entry.size
    return LayerStats(
        digest=index.layer_digest,
        chain_id=chain_id,
        entries=len(index.entries),
        files=counts[pb.ENTRY_TYPE_REGULAR] + counts[pb.ENTRY_TYPE_HARDLINK],
        dirs=counts[pb.ENTRY_TYPE_DIRECTORY],
        symlinks=counts[pb.ENTRY_TYPE_SYMLINK],
        whiteouts=counts[pb.ENTRY_TYPE_WHITEOUT] + counts[pb.ENTRY_TYPE_OPAQUE],
        file_bytes=file_bytes,
        chunks=len(index.chunks),
        chunk_bytes=sum(c.size for c in index.chunks),
        stored_bytes=sum(c.stored_size for c in index.chunks),
    )


def inspect_image(stores: StoreChain, name: str) -> dict:
    """Layers, files, sizes and deduplication of an image (every platform of an index)."""
    digest, record = find_image(stores, name)
    images = []
    for image in image_records(stores, record):
        images.append(_inspect_one(stores, image))
    return {"digest": digest, "references": record.references, "images": images}


def _inspect_one(stores: StoreChain, image: ImageRecord) -> dict:
    layers, seen, unique_stored, total_stored = [], set(), 0, 0
    for layer in image.layers:
        index = load_index(stores, layer.digest)
        stats = layer_stats(index, layer.chain_id)
        layers.append(stats.__dict__)
        for chunk in index.chunks:
            total_stored += chunk.stored_size
            if chunk.sha256 not in seen:
                seen.add(chunk.sha256)
                unique_stored += chunk.stored_size
    tar_bytes = sum(layer.tar_size for layer in image.layers)
    profile = image.profile or {}
    return {
        "manifest_digest": image.manifest_digest,
        "platform": platform_text(image.platform),
        "converter": image.converter,
        "converted_at": image.converted_at,
        "layers": layers,
        "tar_bytes": tar_bytes,
        "stored_bytes": unique_stored,
        "compression_ratio": round(tar_bytes / unique_stored, 2) if unique_stored else None,
        "chunks_shared_between_layers": total_stored - unique_stored,
        "profile_chunks": len(profile.get("chunks", [])),
    }


def describe(record: Record) -> str:
    """A short human label for a record."""
    return ", ".join(record.references) or "(no reference)"
