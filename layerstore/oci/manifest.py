"""The OCI image model: manifests, indexes (OCI and Docker v2 schema 2 lists), descriptors and configs.

One set of rules for every reader (convert, pull, profile, the proxy's trigger):

- the document is JSON (layerstore.jsondoc: malformed or deeply nested JSON is one ImageError), at most
  MAX_MANIFEST_BYTES, schemaVersion 2; Docker schema 1 is refused with what to do;
- its media type is the document's own `mediaType`, else the one it was served or described with; only
  when both are absent or generic (application/json, ...) is it told by shape ("manifests": index,
  "config" and "layers": manifest). An unknown media type is an error;
- every descriptor is an object with a string mediaType (absent is ""), a sha256 digest, and an integer
  size >= 0: a missing size is refused, as containerd and the OCI spec require; annotations are strings;
  a platform has string os and architecture;
- a child fetched through a descriptor must have the descriptor's size;
- nested indexes are followed, as containerd does, at most MAX_INDEX_DEPTH levels in all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from layerstore.digests import chain_ids, check_digest
from layerstore.errors import ImageError
from layerstore.jsondoc import load_json
from layerstore.oci import mediatypes
from layerstore.oci.platform import Platform, platform_from_json

MAX_INDEX_DEPTH = 4  # an index, and indexes nested in it, at most this many levels above a manifest
GENERIC_TYPES = ("", "application/json", "text/plain", "application/octet-stream")


@dataclass(frozen=True)
class Descriptor:
    """A reference to a blob: what it is, its digest and size, and (in an index) its platform."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_index(self) -> bool:
        return self.media_type in mediatypes.INDEXES


@dataclass(frozen=True)
class Manifest:
    """An image manifest (OCI or Docker v2 schema 2)."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class Index:
    """An image index (OCI) or manifest list (Docker)."""

    media_type: str
    manifests: tuple[Descriptor, ...]


def _size(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        shown = "missing" if value is None else repr(value)[:40]
        raise ImageError(f"{what} has no valid size ({shown}): a descriptor needs an integer size >= 0")
    return value


def parse_descriptor(value: Any, what: str) -> Descriptor:
    """A descriptor object; ImageError naming `what` for each rule it breaks."""
    if not isinstance(value, Mapping):
        raise ImageError(f"{what} is not a descriptor object")
    media_type = value.get("mediaType", "")
    if not isinstance(media_type, str):
        raise ImageError(f"{what} has a mediaType that is not a string")
    digest = check_digest(value.get("digest", ""), f"{what} digest")
    size = _size(value.get("size"), what)
    annotations = value.get("annotations") or {}
    if not isinstance(annotations, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
        raise ImageError(f"{what} has annotations that are not an object of strings")
    platform = platform_from_json(value["platform"], what) if value.get("platform") is not None else None
    return Descriptor(media_type, digest, size, platform, dict(annotations))


def kind_of(doc: Any, declared: str | None) -> str | None:
    """The media type of a parsed manifest or index: its own, else a specific `declared`, else by shape; None if none."""
    if not isinstance(doc, Mapping):
        return None
    own = doc.get("mediaType")
    if isinstance(own, str) and own:
        return own
    if declared and declared not in GENERIC_TYPES:
        return declared
    if "manifests" in doc:
        return mediatypes.OCI_INDEX
    if "layers" in doc and "config" in doc:
        return mediatypes.OCI_MANIFEST
    return None


def sniff_media_type(data: bytes, content_type: str) -> str:
    """The media type to serve a manifest with: `content_type` unless generic, else what the body says."""
    declared = content_type.split(";", 1)[0].strip()
    if declared not in GENERIC_TYPES:
        return declared
    try:
        found = kind_of(load_json(data, "manifest", ImageError), None)
    except ImageError:
        found = None
    return found or declared or "application/octet-stream"


def parse_document(data: bytes, declared: str | None, what: str) -> Manifest | Index:
    """A manifest or index from its exact bytes; `declared` is the type it was served or described with."""
    if len(data) > mediatypes.MAX_MANIFEST_BYTES:
        raise ImageError(f"{what}: manifest is {len(data)} bytes, over the {mediatypes.MAX_MANIFEST_BYTES} byte limit")
    doc = load_json(data, f"{what}: manifest", ImageError)
    if not isinstance(doc, dict):
        raise ImageError(f"{what}: manifest is not a JSON object")
    media_type = kind_of(doc, declared)
    if media_type in mediatypes.DOCKER_SCHEMA1 or doc.get("schemaVersion") == 1:
        raise ImageError(f"{what}: Docker schema 1 manifests are not supported; re-push the image with a current client")
    if media_type not in mediatypes.MANIFESTS + mediatypes.INDEXES:
        raise ImageError(f"{what}: unsupported manifest media type {media_type or declared or ''!r}")
    if doc.get("schemaVersion") != 2:
        raise ImageError(f"{what}: unsupported manifest schemaVersion {doc.get('schemaVersion')!r}")
    key = "manifests" if media_type in mediatypes.INDEXES else "layers"
    if not isinstance(doc.get(key), list):
        raise ImageError(f"{what}: malformed manifest: '{key}' is missing or not a list")
    if media_type in mediatypes.INDEXES:
        children = tuple(parse_descriptor(m, f"{what}: manifest {i + 1}") for i, m in enumerate(doc["manifests"]))
        return Index(media_type, children)
    if "config" not in doc:
        raise ImageError(f"{what}: manifest has no config descriptor")
    config = parse_descriptor(doc["config"], f"{what}: config")
    layers = tuple(parse_descriptor(d, f"{what}: layer {i + 1}") for i, d in enumerate(doc["layers"]))
    return Manifest(media_type, config, layers)


# Walking an index down to the manifests of the wanted platforms


@dataclass(frozen=True)
class Node:
    """A fetched manifest or index: its digest, exact bytes and parsed form."""

    digest: str
    body: bytes
    document: Manifest | Index

    @property
    def media_type(self) -> str:
        return self.document.media_type


Fetch = Callable[[Descriptor], tuple[str, bytes]]  # a child descriptor -> (content type, exact bytes)


def fetch_child(fetch: Fetch, child: Descriptor, what: str) -> Node:
    """Fetch and parse the child `child` names; it must be the size its descriptor says."""
    content_type, body = fetch(child)
    if len(body) != child.size:
        raise ImageError(f"{what}@{child.digest} is {len(body)} bytes but its descriptor says {child.size}")
    return Node(child.digest, body, parse_document(body, child.media_type or content_type, f"{what}@{child.digest}"))


def select_manifests(
    top: Node, fetch: Fetch, wanted: Sequence[Platform] | None, what: str, *, first: bool = False
) -> list[list[Node]]:
    """Every path from `top` down to a manifest of a `wanted` platform (None: every runnable platform and
    manifests without one), in index order; `first` stops at the first. ImageError when there is none."""
    paths: list[list[Node]] = []
    seen: list[str] = []

    def chosen(child: Descriptor) -> bool:
        if child.is_index:  # a nested index has no platform of its own, usually: look inside
            return child.platform is None or wanted is None or any(w.matches(child.platform) for w in wanted)
        if child.platform is not None:
            seen.append(str(child.platform))
        if wanted is None:
            return child.platform is None or child.platform.runnable
        return any(w.matches(child.platform) for w in wanted)

    def walk(path: list[Node]) -> None:
        node = path[-1]
        if isinstance(node.document, Manifest):
            paths.append(path)
            return
        if len(path) > MAX_INDEX_DEPTH:
            raise ImageError(f"{what}: indexes nested more than {MAX_INDEX_DEPTH} deep")
        for child in node.document.manifests:
            if first and paths:
                return
            if chosen(child):
                walk([*path, fetch_child(fetch, child, what)])

    walk([top])
    if not paths:
        want = ", ".join(str(w) for w in wanted) if wanted else "any"
        have = ", ".join(sorted(set(seen))) or "none"
        raise ImageError(f"{what}: no manifest for platform {want} (the index has {have}); pass --platform")
    return paths


# Configs and layers


@dataclass(frozen=True)
class ImageLayer:
    """A manifest's layer with what the config says of it."""

    descriptor: Descriptor
    diff_id: str
    chain_id: str
    compression: str  # "gzip", "zstd", "none"


def parse_config(data: bytes, what: str) -> dict:
    """An image config: a JSON object whose rootfs.diff_ids is a list."""
    doc = load_json(data, f"{what}: config", ImageError)
    rootfs = doc.get("rootfs") if isinstance(doc, dict) else None
    if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
        raise ImageError(f"{what}: the config is not an image config with rootfs.diff_ids")
    return doc


def config_platform(config: Mapping[str, Any]) -> dict[str, str]:
    """The os/architecture/variant a config states, as stated."""
    return {k: config[k] for k in ("os", "architecture", "variant") if isinstance(config.get(k), str)}


def image_layers(manifest: Manifest, config: Mapping[str, Any], what: str) -> list[ImageLayer]:
    """The manifest's layers paired with the config's diff_ids and their chain IDs; ImageError for a count
    mismatch, a bad diff_id or a layer media type liftoff does not read (before any work is done)."""
    diff_ids = config["rootfs"]["diff_ids"]
    n = len(manifest.layers)
    if len(diff_ids) != n:
        raise ImageError(f"{what}: the config lists {len(diff_ids)} diff_ids but the manifest has {n} layers")
    checked = [check_digest(d, f"layer {i + 1} diff_id") for i, d in enumerate(diff_ids)]
    layers = []
    for i, (layer, diff_id, chain_id) in enumerate(zip(manifest.layers, checked, chain_ids(checked), strict=True)):
        try:
            compression = mediatypes.layer_compression(layer.media_type)
        except ImageError as e:
            raise ImageError(f"{what}: layer {i + 1}/{n} {layer.digest}: {e}") from None
        layers.append(ImageLayer(layer, diff_id, chain_id, compression))
    return layers
