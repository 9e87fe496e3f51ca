"""Image sources for conversion: a registry reference or an OCI image layout directory."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO, Protocol

from layerstore.digests import check_digest, hex_of
from layerstore.errors import ImageError, LiftoffError
from layerstore.oci import mediatypes
from layerstore.oci.auth import DockerCredentials
from layerstore.oci.bounded import BoundedReader, fetch_deadline
from layerstore.oci.manifest import Index, parse_document
from layerstore.oci.reference import Reference, parse_reference
from layerstore.oci.registry import RegistryClient
from layerstore.records import layout_reference

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"


class ImageSource(Protocol):
    """Where an image's manifests and blobs come from."""

    name: str  # the source as the user wrote it, for messages and records
    reference: str | None  # a registry reference to record with the image, if any

    def resolve(self) -> tuple[str, bytes, str]:
        """The top-level manifest or index: (media type, bytes, digest)."""
        ...

    def manifest(self, digest: str) -> tuple[str, bytes]:
        """A child manifest of an index, by digest: (media type, bytes)."""
        ...

    def open_blob(self, digest: str) -> BinaryIO:
        """A stream of the blob's bytes."""
        ...

    def close(self) -> None: ...


def read_blob(
    source: ImageSource, digest: str, limit: int, what: str, *, size: int | None = None, fetch_timeout: float | None = None
) -> bytes:
    """A small blob (a config), read whole and digest-verified: at most `limit` bytes, and at most the
    descriptor's `size` where given, within the fetch deadline."""
    if size is not None and size > limit:
        raise ImageError(f"{source.name}: {what} {digest} is {size} bytes, over the {limit} byte limit")
    bound = limit if size is None else size
    declared = "the descriptor declares" if size is not None else "allowed"
    with source.open_blob(digest) as stream:
        reader = BoundedReader(
            stream, limit=bound, seconds=fetch_deadline(bound, fetch_timeout), what=f"{what} {digest}", declared=declared
        )
        try:
            data = reader.read_all()
        except LiftoffError as e:
            raise type(e)(f"{source.name}: {e}") from None
    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise ImageError(f"{source.name}: {what} {digest} does not match its digest")
    return data


class RegistrySource:
    """An image in a registry, by reference (host[:port]/repo[:tag][@digest])."""

    def __init__(
        self, text: str, *, plain_http: bool = False, docker_config: str | None = None, fetch_timeout: float | None = None
    ) -> None:
        self.name = text
        self.ref: Reference = parse_reference(text)
        # Record tags, not digests: the record's own key is the digest.
        self.reference = str(Reference(self.ref.registry, self.ref.repository, self.ref.tag)) if self.ref.tag else None
        self.client = RegistryClient(
            self.ref.registry,
            endpoint=self.ref.endpoint,
            plain_http=plain_http,
            credentials=DockerCredentials(docker_config),
            fetch_timeout=fetch_timeout,
        )

    def resolve(self) -> tuple[str, bytes, str]:
        return self.client.get_manifest(self.ref)

    def manifest(self, digest: str) -> tuple[str, bytes]:
        media_type, body, _ = self.client.get_manifest(self.ref, digest)
        return media_type, body

    def open_blob(self, digest: str) -> BinaryIO:
        return self.client.open_blob(self.ref, digest)

    def close(self) -> None:
        self.client.close()


def layout_spec(text: str) -> tuple[str, str | None]:
    """(directory, tag or None) of `oci:DIR[:TAG]` (a DIR that exists as written wins over a tag split)."""
    spec = text[len("oci:") :] if text.startswith("oci:") else text
    if ":" in spec and "/" not in spec.rsplit(":", 1)[1] and not os.path.isdir(spec):
        directory, tag = spec.rsplit(":", 1)
        return directory, tag
    return spec, None


class LayoutSource:
    """An OCI image layout directory: oci:DIR[:TAG]."""

    def __init__(self, text: str) -> None:
        self.name = text
        directory, tag = layout_spec(text)
        self.reference = layout_reference(directory, tag)  # recorded with the image: inspect/rm/verify find it by it
        self.root = Path(directory)
        self.tag = tag
        if not (self.root / "index.json").is_file():
            raise ImageError(f"{text}: {self.root} is not an OCI image layout (no index.json)")

    def _blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / hex_of(check_digest(digest))

    def resolve(self) -> tuple[str, bytes, str]:
        data = _read_capped(self.root / "index.json", mediatypes.MAX_MANIFEST_BYTES, f"{self.name}: index.json")
        index = parse_document(data, mediatypes.OCI_INDEX, f"{self.name}: index.json")
        if not isinstance(index, Index):
            raise ImageError(f"{self.name}: index.json is not an image index")
        manifests = index.manifests
        if self.tag is not None:
            chosen = [m for m in manifests if m.annotations.get(REF_NAME_ANNOTATION) == self.tag]
            if not chosen:
                raise ImageError(f"{self.name}: no image tagged {self.tag!r} in {self.root}/index.json")
        elif len(manifests) == 1:
            chosen = list(manifests)
        else:
            tags = sorted(m.annotations.get(REF_NAME_ANNOTATION, "?") for m in manifests)
            raise ImageError(
                f"{self.name}: the layout holds {len(manifests)} images; name one as oci:DIR:TAG ({', '.join(tags)})"
            )
        descriptor = chosen[0]
        media_type, body = self.manifest(descriptor.digest)
        if len(body) != descriptor.size:
            raise ImageError(
                f"{self.name}: manifest blob {descriptor.digest} is {len(body)} bytes, index.json says {descriptor.size}"
            )
        return descriptor.media_type or media_type, body, descriptor.digest

    def manifest(self, digest: str) -> tuple[str, bytes]:
        try:
            body = _read_capped(self._blob_path(digest), mediatypes.MAX_MANIFEST_BYTES, f"{self.name}: manifest blob {digest}")
        except FileNotFoundError:
            raise ImageError(f"{self.name}: manifest blob {digest} is missing from the layout") from None
        if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            raise ImageError(f"{self.name}: manifest blob {digest} does not match its digest")
        return "", body

    def open_blob(self, digest: str) -> BinaryIO:
        try:
            return open(self._blob_path(digest), "rb")
        except FileNotFoundError:
            raise ImageError(f"{self.name}: blob {digest} is missing from the layout") from None

    def close(self) -> None:
        pass


def _read_capped(path: Path, limit: int, what: str) -> bytes:
    """A small file, refused unread when it is over `limit` bytes (a layout's manifest may be hostile)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(limit + 1) if size <= limit else b""
    if size > limit or len(data) > limit:
        raise ImageError(f"{what} is {max(size, len(data))} bytes, over the {limit} byte limit")
    return data


def open_source(
    text: str, *, plain_http: bool = False, docker_config: str | None = None, fetch_timeout: float | None = None
) -> ImageSource:
    """An ImageSource for `oci:DIR[:TAG]` or a registry reference; `fetch_timeout` replaces the scaled fetch deadline."""
    if text.startswith("oci:"):
        return LayoutSource(text)
    return RegistrySource(text, plain_http=plain_http, docker_config=docker_config, fetch_timeout=fetch_timeout)
