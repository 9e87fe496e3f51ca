"""Convert an image (manifest or multi-platform index) into every configured store.

Write order, per store: chunks, then each layer's index, then chain records,
then the image record. A reader that finds an image record can rely on
everything below it; a conversion killed at any point is completed by running
it again, which skips layers whose index is already everywhere.
"""

from __future__ import annotations

import json
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
from layerstore.digests import chain_ids, check_digest
from layerstore.errors import FormatError, ImageError, LiftoffError, ObjectNotFound
from layerstore.index import decode_index, encode_index
from layerstore.layout import chain_key, image_key, layer_index_key
from layerstore.leases import writing
from layerstore.oci import mediatypes
from layerstore.oci.bounded import BoundedReader, fetch_deadline
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
    media_type, doc = mediatypes.parse_document(body, media_type, f"{source.name}")
    workers = options.workers or default_workers(stores)
    with writing(stores, f"liftoff convert {source.name}"):  # no gc deletes what this conversion reuses
        uploader = ChunkUploader(stores, workers=workers, max_pending=4 * workers, level=options.zstd_level)
        try:
            if media_type in mediatypes.INDEXES:
                images = _convert_index(source, stores, options, uploader, digest, media_type, body, doc)
            else:
                images = [_convert_manifest(source, stores, options, uploader, digest, media_type, body, doc)]
        finally:
            uploader.close()
            options.progress.close()
    return ConvertResult(source.name, digest, media_type, images, time.monotonic() - started)


def default_workers(stores: list[Store]) -> int:
    """One chunk worker per core for local stores (CPU-bound: more threads measured slower on 2 cores);
    16 when a store is remote, so HEAD/PUT round trips overlap."""
    return 16 if any(store.remote for store in stores) else (os.cpu_count() or 2)


def _platform_text(platform: dict) -> str:
    parts = [platform.get("os", ""), platform.get("architecture", "")]
    if platform.get("variant"):
        parts.append(platform["variant"])
    return "/".join(parts)


def _wanted(platform: dict, wanted: list[str] | None) -> bool:
    if platform.get("os") == "unknown":  # attestation manifests, not runnable images
        return False
    if not wanted:
        return True
    text = _platform_text(platform)
    return any(text == w or (w.count("/") == 1 and text.startswith(w + "/")) for w in wanted)


def _convert_index(source, stores, options, uploader, digest, media_type, body, doc) -> list[ManifestResult]:
    children = [m for m in doc["manifests"] if isinstance(m, dict)]
    chosen = [m for m in children if _wanted(m.get("platform") or {}, options.platforms)]
    if not chosen:
        have = ", ".join(sorted({_platform_text(m.get("platform") or {}) for m in children})) or "none"
        raise ImageError(f"{source.name}: no manifest for platform {', '.join(options.platforms or ['any'])} (index has: {have})")
    results = []
    for child in chosen:
        child_digest = check_digest(child.get("digest", ""), "manifest digest")
        child_type, child_body = source.manifest(child_digest)
        child_type, child_doc = mediatypes.parse_document(
            child_body, child.get("mediaType") or child_type, f"{source.name}@{child_digest}"
        )
        if child_type in mediatypes.INDEXES:
            raise ImageError(f"{source.name}: nested image indexes are not supported ({child_digest})")
        results.append(_convert_manifest(source, stores, options, uploader, child_digest, child_type, child_body, child_doc))
    record = IndexRecord(
        digest=digest,
        media_type=media_type,
        manifest=body,
        manifests=[{"digest": r.manifest_digest, "platform": r.platform} for r in results],
        references=[source.reference] if source.reference else [],
        converter=CONVERTER,
        converted_at=_now(),
    )
    for store in stores:
        store.sync()
        _put_image_record(store, image_key(digest), record)
    return results


def _read_config(source: ImageSource, doc: dict, what: str, fetch_timeout: float | None) -> tuple[str, bytes, dict]:
    config_desc = doc.get("config")
    if not isinstance(config_desc, dict):
        raise ImageError(f"{what}: manifest has no config descriptor")
    config_digest = check_digest(config_desc.get("digest", ""), "config digest")
    size = config_desc.get("size")
    config = read_blob(
        source,
        config_digest,
        MAX_CONFIG_BYTES,
        "config",
        size=size if isinstance(size, int) and size >= 0 else None,
        fetch_timeout=fetch_timeout,
    )
    try:
        parsed = json.loads(config)
        diff_ids = parsed["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError):
        raise ImageError(f"{what}: config {config_digest} is not an image config with rootfs.diff_ids") from None
    if not isinstance(diff_ids, list):
        raise ImageError(f"{what}: config rootfs.diff_ids is not a list")
    return config_digest, config, parsed


def _convert_manifest(source, stores, options, uploader, digest, media_type, body, doc) -> ManifestResult:
    what = f"{source.name}@{digest}" if source.name.split("@")[-1] != digest else source.name
    config_digest, config, parsed = _read_config(source, doc, what, options.fetch_timeout)
    layers = doc["layers"]
    diff_ids = parsed["rootfs"]["diff_ids"]
    if len(diff_ids) != len(layers):
        raise ImageError(f"{what}: config lists {len(diff_ids)} diff_ids but the manifest has {len(layers)} layers")
    specs = []
    for i, (layer, diff_id) in enumerate(zip(layers, diff_ids, strict=True)):
        if not isinstance(layer, dict):
            raise ImageError(f"{what}: layer {i + 1} descriptor is not an object")
        size = layer.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageError(f"{what}: layer {i + 1} descriptor has no valid size ({size!r})")
        specs.append(
            LayerSpec(
                digest=check_digest(layer.get("digest", ""), f"layer {i + 1} digest"),
                size=size,
                media_type=str(layer.get("mediaType", "")),
                diff_id=check_digest(diff_id, f"layer {i + 1} diff_id"),
            )
        )
    for i, spec in enumerate(specs):  # refuse unsupported media types before any work
        try:
            mediatypes.layer_compression(spec.media_type)
        except ImageError as e:
            raise ImageError(f"{what}: layer {i + 1}/{len(specs)} {spec.digest}: {e}") from None
    chains = chain_ids([s.diff_id for s in specs])
    platform = {k: parsed[k] for k in ("os", "architecture", "variant") if isinstance(parsed.get(k), str)}
    options.progress.begin(what, len(specs))

    def one(i: int) -> LayerResult:
        try:
            result = _convert_one_layer(source, stores, options, uploader, specs[i], chains[i])
        except LiftoffError as e:
            raise type(e)(f"{what}: layer {i + 1}/{len(specs)} {specs[i].digest}: {e}") from None
        options.progress.layer_done()
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
        media_type=media_type,
        manifest=body,
        config_digest=config_digest,
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
        return LayerResult(spec.digest, spec.diff_id, chain_id, existing.tar_size, files, len(existing.chunks), 0, 0, True)
    with source.open_blob(spec.digest) as raw:
        blob = BoundedReader(  # stops one byte past the declared size, and at the fetch deadline
            raw, limit=spec.size, seconds=fetch_deadline(spec.size, options.fetch_timeout), what="the blob"
        )
        converted = convert_layer(
            spec, blob, uploader, options.chunk_size, lambda n: options.progress.layer_bytes(spec.digest, n)
        )
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
