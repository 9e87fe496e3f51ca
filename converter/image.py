"""Convert an image (manifest or multi-platform index) into every configured store.

Write order, per store: chunks, then each layer's index, then chain records,
then the image record. A reader that finds an image record can rely on
everything below it; a conversion killed at any point is completed by running
it again, which skips layers whose index is already everywhere.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from converter.layer import LayerSpec, convert_layer
from converter.progress import Progress
from converter.upload import ChunkUploader
from layerstore import CONVERTER
from layerstore.chunker import DEFAULT_CHUNK_SIZE
from layerstore.errors import FormatError, ImageError, LiftoffError, ObjectNotFound
from layerstore.index import decode_index, encode_index
from layerstore.layout import chain_key, image_key, layer_index_key
from layerstore.leases import writing
from layerstore.oci.bounded import BoundedReader, fetch_deadline
from layerstore.oci.manifest import (
    Index,
    Manifest,
    Node,
    config_platform,
    image_layers,
    parse_config,
    parse_document,
    select_manifests,
)
from layerstore.oci.platform import parse_platforms
from layerstore.oci.source import ImageSource, read_blob
from layerstore.records import ChainRecord, ImageRecord, IndexRecord, LayerRecord, parse_image_key_record
from layerstore.stores import Store

MAX_CONFIG_BYTES = 8 << 20


@dataclass
class ConvertOptions:
    """Knobs of a conversion."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    platforms: list[str] | None = None  # "os/arch[/variant]"; None converts every platform
    workers: int | None = None  # chunk hash/compress/upload threads (default: see default_workers)
    layer_jobs: int = max(1, (os.cpu_count() or 2) // 2)  # layers converted at once
    zstd_level: int = 3
    fetch_timeout: float | None = None  # seconds one blob fetch may take (default: scaled from its size)
    progress: Progress = field(default_factory=lambda: Progress(enabled=False))


@dataclass
class LayerResult:
    digest: str
    diff_id: str
    chain_id: str
    bytes_in: int  # uncompressed tar bytes
    files: int
    chunks: int
    chunks_new: int
    bytes_uploaded: int
    already_converted: bool


@dataclass
class ManifestResult:
    manifest_digest: str
    platform: dict[str, str]
    layers: list[LayerResult]
    record_written: bool


@dataclass
class ConvertResult:
    source: str
    digest: str
    media_type: str
    images: list[ManifestResult]
    seconds: float = 0.0

    def summary(self) -> dict:
        """The --json document."""
        layers = [layer for image in self.images for layer in image.layers]
        chunks = sum(layer.chunks for layer in layers)
        new = sum(layer.chunks_new for layer in layers)
        return {
            "image": self.source,
            "manifest_digest": self.digest,
            "media_type": self.media_type,
            "images": [asdict(image) for image in self.images],
            "bytes_in": sum(layer.bytes_in for layer in layers),
            "files": sum(layer.files for layer in layers),
            "chunks_total": chunks,
            "chunks_new": new,
            "bytes_uploaded": sum(layer.bytes_uploaded for layer in layers),
            "dedupe_ratio": round(1 - new / chunks, 4) if chunks else 0.0,
            "seconds": round(self.seconds, 3),
        }


def convert_image(source: ImageSource, stores: list[Store], options: ConvertOptions | None = None) -> ConvertResult:
    """Convert `source` into every store in `stores`; raises LiftoffError with a one-line cause."""
    options = options or ConvertOptions()
    started = time.monotonic()
    for store in stores:
        store.prepare_writes()
    media_type, body, digest = source.resolve()
    top = Node(digest, body, parse_document(body, media_type, source.name))
    wanted = parse_platforms(options.platforms)
    workers = options.workers or default_workers(stores)
    with writing(stores, f"liftoff convert {source.name}"):  # no gc deletes what this conversion reuses
        uploader = ChunkUploader(stores, workers=workers, max_pending=4 * workers, level=options.zstd_level)
        try:
            if isinstance(top.document, Index):
                paths = select_manifests(top, lambda child: source.manifest(child.digest), wanted, source.name)
                images = [_convert_manifest(source, stores, options, uploader, path[-1]) for path in paths]
                _write_index_record(source, stores, top, images)
            else:
                images = [_convert_manifest(source, stores, options, uploader, top)]
        finally:
            uploader.close()
            options.progress.close()
    return ConvertResult(source.name, digest, top.media_type, images, time.monotonic() - started)


def default_workers(stores: list[Store]) -> int:
    """One chunk worker per core for local stores (CPU-bound: more threads measured slower on 2 cores);
    16 when a store is remote, so HEAD/PUT round trips overlap."""
    return 16 if any(store.remote for store in stores) else (os.cpu_count() or 2)


def _write_index_record(source: ImageSource, stores: list[Store], top: Node, results: list[ManifestResult]) -> None:
    record = IndexRecord(
        digest=top.digest,
        media_type=top.media_type,
        manifest=top.body,
        manifests=[{"digest": r.manifest_digest, "platform": r.platform} for r in results],
        references=[source.reference] if source.reference else [],
        converter=CONVERTER,
        converted_at=_now(),
    )
    for store in stores:
        store.sync()
        _put_image_record(store, image_key(top.digest), record)


def _convert_manifest(source, stores, options, uploader, node: Node) -> ManifestResult:
    digest, manifest = node.digest, node.document
    assert isinstance(manifest, Manifest)
    what = f"{source.name}@{digest}" if source.name.split("@")[-1] != digest else source.name
    config_desc = manifest.config
    config = read_blob(
        source, config_desc.digest, MAX_CONFIG_BYTES, "config", size=config_desc.size, fetch_timeout=options.fetch_timeout
    )
    parsed = parse_config(config, what)
    layers = image_layers(manifest, parsed, what)  # refuses unsupported media types before any work
    specs = [LayerSpec(x.descriptor.digest, x.descriptor.size, x.descriptor.media_type, x.diff_id) for x in layers]
    chains = [x.chain_id for x in layers]
    platform = config_platform(parsed)
    options.progress.begin(what, sum(spec.size for spec in specs))  # compressed bytes: what is read

    def one(i: int) -> LayerResult:
        try:
            result = _convert_one_layer(source, stores, options, uploader, specs[i], chains[i])
        except LiftoffError as e:
            raise type(e)(f"{what}: layer {i + 1}/{len(specs)} {specs[i].digest}: {e}") from None
        return result

    with ThreadPoolExecutor(max(1, options.layer_jobs), thread_name_prefix="layer") as pool:
        futures = [pool.submit(one, i) for i in range(len(specs))]
        results = []
        first_error = None
        for future in futures:
            try:
                results.append(future.result())
            except BaseException as e:
                first_error = first_error or e
        if first_error is not None:
            raise first_error
    for store in stores:
        store.sync()
        for i, spec in enumerate(specs):
            record = ChainRecord(chains[i], spec.digest, spec.diff_id, chains[i - 1] if i else None)
            if i == len(specs) - 1:  # the top of this image: lets a snapshotter find the image (and its profile)
                record.images = sorted({digest, *_existing_images(store, chains[i])})
            _put_if_changed(store, chain_key(chains[i]), record.to_json())
        store.sync()
    record = ImageRecord(
        manifest_digest=digest,
        media_type=node.media_type,
        manifest=node.body,
        config_digest=config_desc.digest,
        config=config,
        platform=platform,
        layers=[
            LayerRecord(s.digest, s.diff_id, chains[i], s.media_type, s.size, r.bytes_in, r.files, r.chunks)
            for i, (s, r) in enumerate(zip(specs, results, strict=True))
        ],
        references=[source.reference] if source.reference else [],
        converter=CONVERTER,
        converted_at=_now(),
    )
    written = [_put_image_record(store, image_key(digest), record) for store in stores]
    return ManifestResult(digest, platform, results, any(written))


def _convert_one_layer(source, stores, options, uploader, spec: LayerSpec, chain_id: str) -> LayerResult:
    key = layer_index_key(spec.digest)
    existing = _existing_index(stores, key)
    if existing is not None:
        if existing.layer_size != spec.size:
            raise ImageError(f"the manifest says {spec.size} bytes, but blob {spec.digest} is {existing.layer_size} bytes")
        if existing.diff_id != spec.diff_id:
            raise ImageError(f"uncompressed digest {existing.diff_id} does not match the config's diff_id {spec.diff_id}")
        files = len(existing.entries)
        options.progress.skip(spec.size)
        return LayerResult(spec.digest, spec.diff_id, chain_id, existing.tar_size, files, len(existing.chunks), 0, 0, True)
    with source.open_blob(spec.digest) as raw:
        blob = BoundedReader(  # stops one byte past the declared size, and at the fetch deadline
            raw,
            limit=spec.size,
            seconds=fetch_deadline(spec.size, options.fetch_timeout),
            what="the blob",
            on_read=options.progress.read,
        )
        converted = convert_layer(spec, blob, uploader, options.chunk_size)
    data = encode_index(converted.index)
    for store in stores:
        store.sync()  # chunks are durable before the index that names them
        store.put(key, data)
    index = converted.index
    return LayerResult(
        spec.digest,
        spec.diff_id,
        chain_id,
        index.tar_size,
        len(index.entries),
        len(index.chunks),
        converted.chunks_new,
        converted.bytes_uploaded + len(data) * len(stores),
        False,
    )


def _existing_index(stores: list[Store], key: str):
    """The layer's index if every store already has a valid one, else None."""
    index = None
    for store in stores:
        try:
            index = decode_index(store.get(key), f"{store.url}/{key}")
        except (ObjectNotFound, FormatError):
            return None
    return index


def _existing_images(store: Store, chain_id: str) -> list[str]:
    try:
        return ChainRecord.from_json(store.get(chain_key(chain_id)), chain_key(chain_id)).images
    except (ObjectNotFound, FormatError):
        return []


def _put_if_changed(store: Store, key: str, data: bytes) -> bool:
    try:
        if store.get(key) == data:
            return False
    except ObjectNotFound:
        pass
    store.put(key, data)
    return True


def _put_image_record(store: Store, key: str, record: ImageRecord | IndexRecord) -> bool:
    """Write the record, keeping what an earlier conversion recorded (references, profile, time)."""
    try:
        old = parse_image_key_record(store.get(key), f"{store.url}/{key}")
    except (ObjectNotFound, FormatError):
        old = None
    if old is not None and type(old) is type(record):
        record.references = sorted(set(old.references) | set(record.references))
        record.converted_at = old.converted_at or record.converted_at
        if isinstance(record, ImageRecord) and isinstance(old, ImageRecord):
            record.profile = old.profile
    else:
        record.references = sorted(set(record.references))
    return _put_if_changed(store, key, record.to_json())


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
