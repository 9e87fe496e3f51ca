"""Chain and image records: small JSON documents next to the indexes.

    chains/sha256/<chainID>  {"schema": "liftoff.chain.v1", chain_id, layer_digest, diff_id, parent}
    images/sha256/<digest>   {"schema": "liftoff.image.v1", ...}  one per image manifest
                             {"schema": "liftoff.index.v1", ...}  one per multi-platform index

An image record keeps the manifest and config bytes exactly (base64), so a
client can create the image in containerd from the store alone, and the
startup profile once one is recorded.

Its references are the names it was converted from: a registry reference with its
tag (`host/repo:tag`, normalized as docker does), or an OCI layout as
`oci:<absolute directory>[:<tag>]` (layout_reference).
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from layerstore.errors import FormatError

CHAIN_SCHEMA = "liftoff.chain.v1"
IMAGE_SCHEMA = "liftoff.image.v1"
INDEX_SCHEMA = "liftoff.index.v1"


@dataclass
class ChainRecord:
    """Maps a chainID (what containerd's unpacker names) to the layer that completes it."""

    chain_id: str
    layer_digest: str
    diff_id: str
    parent: str | None  # the chainID below, None for the bottom layer
    images: list[str] = field(default_factory=list)  # manifest digests whose top layer completes this chain

    def to_json(self) -> bytes:
        return _dump({"schema": CHAIN_SCHEMA, **asdict(self)})

    @classmethod
    def from_json(cls, data: bytes, where: str) -> ChainRecord:
        doc = _load(data, CHAIN_SCHEMA, where)
        try:
            return cls(doc["chain_id"], doc["layer_digest"], doc["diff_id"], doc.get("parent"), list(doc.get("images") or []))
        except (KeyError, TypeError) as e:
            raise FormatError(f"{where}: malformed chain record ({e})") from None


@dataclass
class LayerRecord:
    """One layer of an image as converted."""

    digest: str
    diff_id: str
    chain_id: str
    media_type: str
    size: int  # bytes of the source blob
    tar_size: int  # bytes of the uncompressed tar
    files: int
    chunks: int


@dataclass
class ImageRecord:
    """A converted image manifest: its layers, the exact manifest/config, and the startup profile."""

    manifest_digest: str
    media_type: str
    manifest: bytes
    config_digest: str
    config: bytes
    platform: dict[str, str]
    layers: list[LayerRecord]
    references: list[str] = field(default_factory=list)
    converter: str = ""
    converted_at: str = ""
    profile: dict[str, Any] | None = None

    def to_json(self) -> bytes:
        doc = asdict(self)
        doc["manifest"] = base64.b64encode(self.manifest).decode()
        doc["config"] = base64.b64encode(self.config).decode()
        return _dump({"schema": IMAGE_SCHEMA, **doc})

    @classmethod
    def from_doc(cls, doc: dict[str, Any], where: str) -> ImageRecord:
        try:
            return cls(
                manifest_digest=doc["manifest_digest"],
                media_type=doc["media_type"],
                manifest=base64.b64decode(doc["manifest"]),
                config_digest=doc["config_digest"],
                config=base64.b64decode(doc["config"]),
                platform=doc.get("platform") or {},
                layers=[LayerRecord(**layer) for layer in doc["layers"]],
                references=list(doc.get("references") or []),
                converter=doc.get("converter", ""),
                converted_at=doc.get("converted_at", ""),
                profile=doc.get("profile"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{where}: malformed image record ({e})") from None


@dataclass
class IndexRecord:
    """A converted multi-platform image index: which manifests it holds."""

    digest: str
    media_type: str
    manifest: bytes
    manifests: list[dict[str, Any]]  # [{"digest": ..., "platform": {...}}] of converted children
    references: list[str] = field(default_factory=list)
    converter: str = ""
    converted_at: str = ""

    def to_json(self) -> bytes:
        doc = asdict(self)
        doc["manifest"] = base64.b64encode(self.manifest).decode()
        return _dump({"schema": INDEX_SCHEMA, **doc})

    @classmethod
    def from_doc(cls, doc: dict[str, Any], where: str) -> IndexRecord:
        try:
            return cls(
                digest=doc["digest"],
                media_type=doc["media_type"],
                manifest=base64.b64decode(doc["manifest"]),
                manifests=list(doc["manifests"]),
                references=list(doc.get("references") or []),
                converter=doc.get("converter", ""),
                converted_at=doc.get("converted_at", ""),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{where}: malformed index record ({e})") from None


def layout_reference(directory: str | os.PathLike[str], tag: str | None) -> str:
    """The reference recorded for an image converted from an OCI layout: `oci:<absolute dir>[:<tag>]`,
    so the same layout named from another working directory finds the same record."""
    return f"oci:{os.path.abspath(directory)}" + (f":{tag}" if tag else "")


def parse_image_key_record(data: bytes, where: str) -> ImageRecord | IndexRecord:
    """Parse what lies at images/sha256/<hex>: an image or an index record."""
    doc = _load(data, None, where)
    if doc.get("schema") == IMAGE_SCHEMA:
        return ImageRecord.from_doc(doc, where)
    if doc.get("schema") == INDEX_SCHEMA:
        return IndexRecord.from_doc(doc, where)
    raise FormatError(f"{where}: unknown record schema {doc.get('schema')!r}; upgrade liftoff")


def _dump(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def _load(data: bytes, schema: str | None, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{where}: record is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{where}: record is not a JSON object")
    if schema and doc.get("schema") != schema:
        raise FormatError(f"{where}: expected a {schema} record, found {doc.get('schema')!r}")
    return doc
