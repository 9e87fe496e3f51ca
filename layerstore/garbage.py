"""`liftoff rm` and `liftoff gc`: remove images from a store, then free what nothing references.

The image records (images/) are the roots. gc marks every layer index, chain
record and chunk that an image record reaches (its layers' indexes and their
chunk tables, its profile's chunks) and deletes the rest of chunks/, layers/ and
chains/: what removed images, re-recorded profiles (relayout writes new hot chunks
and a new index) and killed conversions left. It also deletes expired leases and a
file store's half-written temp files. It runs under a gc lease (layerstore.leases),
so no writer relies on an unreferenced object meanwhile; while a writer works it
changes nothing and says so. A record or index it cannot read stops it before any
deletion: it cannot tell what that image needs.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from layerstore.catalog import find_image, iter_records, load_record
from layerstore.errors import FormatError, LiftoffError, ObjectNotFound
from layerstore.index import decode_index
from layerstore.layout import CHAINS, CHUNKS, IMAGES, LAYERS, chain_key, chunk_key, digest_from_key, image_key, layer_index_key
from layerstore.leases import DEFAULT_TTL, collecting
from layerstore.records import IndexRecord, parse_image_key_record
from layerstore.stores import Store, StoreChain

log = logging.getLogger(__name__)

SWEPT = {"chunks": CHUNKS, "layers": LAYERS, "chains": CHAINS}


@dataclass
class GcReport:
    """What one gc run found and removed in one store."""

    store: str
    images: int = 0
    live_objects: int = 0
    removed: dict[str, int] = field(default_factory=dict)  # per kind: chunks, layers, chains
    removed_bytes: int = 0
    kept_bytes: int = 0
    expired_leases: int = 0
    temp_files: int = 0
    dry_run: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def live_keys(store: Store, workers: int = 16) -> tuple[set[str], int]:
    """Every key an image record reaches, and the number of image records. Layer indexes are read
    concurrently (`workers` at once) when the store is remote."""
    live: set[str] = set()
    images = 0
    layers: dict[str, str] = {}  # layer digest -> an image that needs it (for messages)
    for key in store.list(IMAGES):
        try:
            record = parse_image_key_record(store.get(key), f"{store.url}/{key}")
        except ObjectNotFound:
            continue  # removed since the listing
        except FormatError as e:
            digest = digest_from_key(key, IMAGES)
            raise FormatError(
                f"{e}. gc cannot tell what that image references and deleted nothing: convert the image again, "
                f"or remove the record with liftoff rm {digest}"
            ) from None
        images += 1
        live.add(key)
        if isinstance(record, IndexRecord):
            continue  # its platforms have records of their own
        for layer in record.layers:
            live.update((chain_key(layer.chain_id), layer_index_key(layer.digest)))
            layers.setdefault(layer.digest, ", ".join(record.references) or record.manifest_digest)
        for chunk in (record.profile or {}).get("chunks", []):
            try:
                live.add(chunk_key(bytes.fromhex(chunk["sha256"])))
            except (KeyError, TypeError, ValueError):
                raise FormatError(
                    f"{store.url}/{key}: malformed profile chunk {chunk!r}. gc deleted nothing: record the profile "
                    "again (liftoff profile)"
                ) from None

    def chunks_of(digest: str) -> list[str]:
        key = layer_index_key(digest)
        try:
            index = decode_index(store.get(key), f"{store.url}/{key}")
        except ObjectNotFound:
            log.warning("image %s lacks the index of layer %s (run liftoff verify)", layers[digest], digest)
            return []
        except FormatError as e:
            raise FormatError(
                f"{e}. gc cannot tell which chunks layer {digest} needs and deleted nothing: convert {layers[digest]} again"
            ) from None
        return [chunk_key(chunk.sha256) for chunk in index.chunks]

    with ThreadPoolExecutor(workers if store.remote else 1) as pool:
        for keys in pool.map(chunks_of, layers):
            live.update(keys)
    return live, images


def collect_garbage(store: Store, dry_run: bool = False, ttl: float = DEFAULT_TTL) -> GcReport:
    """Delete what no image in `store` references (see the module docstring); returns what was done."""
    started = time.monotonic()
    report = GcReport(store.url, dry_run=dry_run)
    with collecting(store, ttl) as (_lease, expired):
        live, report.images = live_keys(store)
        report.live_objects = len(live)
        doomed: list[str] = []
        for kind, prefix in SWEPT.items():
            count = 0
            for key, size in store.list_sized(prefix):
                if key in live:
                    report.kept_bytes += size
                    continue
                doomed.append(key)
                report.removed_bytes += size
                count += 1
            report.removed[kind] = count
        report.expired_leases = len(expired)
        if not dry_run:
            store.delete_many(doomed)
            store.delete_many(expired)
            report.temp_files = store.sweep_temps()
    report.seconds = time.monotonic() - started
    return report


def remove_image(stores: list[Store], name: str) -> list[str]:
    """Delete the record of image `name` (a digest or a reference) from every store; for a multi-platform
    index, also its platforms' records unless another index lists them or they were converted under a name
    of their own; an unreadable record, by its digest. Returns the digests removed. The chunks stay until
    `liftoff gc` runs."""
    chain = StoreChain(stores)
    try:
        digest, record = find_image(chain, name)
    except FormatError:
        if not name.startswith("sha256:"):
            raise
        digest, record = name, None  # an unreadable record goes, by its digest
    indexes = {d: r for d, r in iter_records(chain) if isinstance(r, IndexRecord) and d != digest}
    listed_by = [d for d, r in indexes.items() if any(m["digest"] == digest for m in r.manifests)]
    if listed_by:
        raise LiftoffError(
            f"{digest} is a platform of the multi-platform image {listed_by[0]}: remove that (liftoff rm {listed_by[0]})"
        )
    doomed = [digest]
    if isinstance(record, IndexRecord):
        shared = {m["digest"] for r in indexes.values() for m in r.manifests}
        for child in record.manifests:
            if child["digest"] in shared:
                continue
            try:
                child_record = load_record(chain, child["digest"])
            except ObjectNotFound:
                continue
            if set(child_record.references) - set(record.references):
                continue  # also converted on its own, under another name
            doomed.append(child["digest"])
    for store in stores:
        for each in doomed:  # the index first: no index ever lists a missing platform record
            store.delete(image_key(each))
    return doomed
