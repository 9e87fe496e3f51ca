"""Finding images and layers in a store: records by digest or name, layer indexes."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from layerstore.errors import FormatError, LiftoffError, ObjectNotFound
from layerstore.index import decode_index, decompress_chunk
from layerstore.layout import IMAGES, chunk_key, digest_from_key, image_key, layer_index_key
from layerstore.oci.reference import parse_reference
from layerstore.pb.liftoff.index.v1 import index_pb2 as pb
from layerstore.records import ImageRecord, IndexRecord, layout_reference, parse_image_key_record
from layerstore.stores import Store, StoreChain

Record = ImageRecord | IndexRecord


def _chain(stores: Store | StoreChain) -> StoreChain:
    return stores if isinstance(stores, StoreChain) else StoreChain([stores])


def load_record(stores: Store | StoreChain, digest: str) -> Record:
    """The image or index record of a manifest digest."""
    key = image_key(digest)
    return parse_image_key_record(_chain(stores).get(key), key)


def iter_records(stores: Store | StoreChain) -> Iterator[tuple[str, Record]]:
    """Every (digest, record) in the stores; unreadable records are skipped."""
    chain = _chain(stores)
    for key in sorted(chain.list(IMAGES)):
        digest = digest_from_key(key, IMAGES)
        try:
            yield digest, parse_image_key_record(chain.get(key), key)
        except (ObjectNotFound, FormatError):
            continue


def find_image(stores: Store | StoreChain, name: str) -> tuple[str, Record]:
    """Resolve `name` (a manifest digest, or a reference the image was converted from) to its record."""
    if name.startswith("sha256:"):
        try:
            return name, load_record(stores, name)
        except ObjectNotFound:
            raise ObjectNotFound(f"no image {name} in the store: run liftoff convert first") from None
    if name.startswith("oci:"):
        return _find_layout_image(stores, name)
    wanted = {name}
    try:
        wanted.add(str(parse_reference(name)))
    except LiftoffError:
        pass
    matches = [(d, r) for d, r in iter_records(stores) if wanted & set(r.references)]
    indexes = [m for m in matches if isinstance(m[1], IndexRecord)]
    if indexes:
        return indexes[0]
    if matches:
        return matches[0]
    raise ObjectNotFound(f"no image named {name!r} in the store: run liftoff convert {name} first, or pass a digest")


def _find_layout_image(stores: Store | StoreChain, name: str) -> tuple[str, Record]:
    """`oci:DIR[:TAG]` as convert resolves it: the layout's manifest digest; if the layout is gone
    or unreadable, the record converted under that name (layout_reference)."""
    from layerstore.oci.source import LayoutSource, layout_spec  # the registry client only when needed

    try:
        _, _, digest = LayoutSource(name).resolve()
    except (LiftoffError, OSError):
        digest = None
    if digest is not None:
        try:
            return digest, load_record(stores, digest)
        except ObjectNotFound:
            raise ObjectNotFound(
                f"{name} is image {digest}, which is not in the store: run liftoff convert {name} first"
            ) from None
    reference = layout_reference(*layout_spec(name))
    matches = [(d, r) for d, r in iter_records(stores) if reference in r.references]
    indexes = [m for m in matches if isinstance(m[1], IndexRecord)]
    if indexes or matches:
        return (indexes or matches)[0]
    raise ObjectNotFound(f"no image converted from {reference} in the store: run liftoff convert {name} first")


def image_records(stores: Store | StoreChain, record: Record) -> list[ImageRecord]:
    """The image records behind a record: itself, or each platform of an index."""
    if isinstance(record, ImageRecord):
        return [record]
    out = []
    for child in record.manifests:
        child_record = load_record(stores, child["digest"])
        if isinstance(child_record, ImageRecord):
            out.append(child_record)
    return out


def load_index(stores: Store | StoreChain, layer_digest: str) -> pb.LayerIndex:
    """A layer's parsed, validated index."""
    key = layer_index_key(layer_digest)
    return decode_index(_chain(stores).get(key), key)


def set_profile(stores: list[Store], digest: str, profile: dict | None) -> int:
    """Replace the startup profile of image `digest` in every store that holds it (an atomic
    replace of the record); returns how many records were written."""
    key = image_key(digest)
    written = 0
    for store in stores:
        try:
            record = parse_image_key_record(store.get(key), f"{store.url}/{key}")
        except ObjectNotFound:
            continue
        if not isinstance(record, ImageRecord):
            raise FormatError(f"{digest} is a multi-platform index: record the profile of one of its images")
        record.profile = profile
        store.put(key, record.to_json())
        written += 1
    if not written:
        raise ObjectNotFound(f"no image {digest} in {', '.join(s.url for s in stores)}: convert it first")
    return written


class ChunkReader:
    """A layer's chunks by table number, fetched, verified and decompressed on demand, with a
    small LRU (packed chunks are read in runs). For tools that read whole layers (verify, relayout)."""

    def __init__(self, stores: Store | StoreChain, index: pb.LayerIndex, keep: int = 32) -> None:
        self.stores, self.index, self.keep = _chain(stores), index, keep
        self.cache: OrderedDict[int, bytes] = OrderedDict()

    def __call__(self, number: int) -> bytes:
        data = self.cache.get(number)
        if data is None:
            chunk = self.index.chunks[number]
            key = chunk_key(chunk.sha256)
            data = self.cache[number] = decompress_chunk(self.stores.get(key), chunk.sha256, chunk.size, key)
            if len(self.cache) > self.keep:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(number)
        return data
