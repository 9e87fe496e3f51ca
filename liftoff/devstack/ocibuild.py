"""Write small OCI images (layers from member lists) into an OCI image layout.

Used by `liftoff demo`, the tests and the benchmarks to build images whose
every byte and bit of metadata is known.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from layerstore.oci import mediatypes

_KINDS = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


@dataclass
class Member:
    """One tar member. mtime_ns keeps nanoseconds (written as a pax mtime)."""

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mtime_ns: int = 1_700_000_000 * 10**9
    linkname: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    devmajor: int = 0
    devminor: int = 0


def make_tar(members: list[Member]) -> bytes:
    """A pax tar of `members`, in order."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type = _KINDS[m.kind]
            info.mode = m.mode if m.mode is not None else (0o755 if m.kind == "dir" else 0o644)
            info.uid, info.gid, info.uname, info.gname = m.uid, m.gid, m.uname, m.gname
            info.linkname = m.linkname
            info.devmajor, info.devminor = m.devmajor, m.devminor
            seconds, nanos = divmod(m.mtime_ns, 10**9)
            info.mtime = seconds
            pax = {}
            if nanos:
                pax["mtime"] = f"{seconds}.{nanos:09d}"
            for key, value in m.xattrs.items():
                pax[f"SCHILY.xattr.{key}"] = value.decode("utf-8", "surrogateescape")
            info.pax_headers = pax
            if m.kind == "file":
                info.size = len(m.data)
                tar.addfile(info, io.BytesIO(m.data))
            else:
                tar.addfile(info)
    return out.getvalue()


def compress(tar: bytes, compression: str) -> bytes:
    """Compress a layer tar: 'gzip', 'zstd' or 'none'."""
    if compression == "gzip":
        return gzip.compress(tar, compresslevel=6, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(tar)
    return tar


_LAYER_TYPES = {
    ("oci", "gzip"): "application/vnd.oci.image.layer.v1.tar+gzip",
    ("oci", "zstd"): "application/vnd.oci.image.layer.v1.tar+zstd",
    ("oci", "none"): "application/vnd.oci.image.layer.v1.tar",
    ("docker", "gzip"): "application/vnd.docker.image.rootfs.diff.tar.gzip",
    ("docker", "none"): "application/vnd.docker.image.rootfs.diff.tar",
}


class LayoutWriter:
    """Builds an OCI image layout directory: blobs, manifests, indexes, index.json tags."""

    def __init__(self, directory: str | Path) -> None:
        self.root = Path(directory)
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        self.tags: list[dict] = []

    def add_blob(self, data: bytes) -> tuple[str, int]:
        """Store a blob; returns (digest, size)."""
        digest = hashlib.sha256(data).hexdigest()
        (self.root / "blobs" / "sha256" / digest).write_bytes(data)
        return f"sha256:{digest}", len(data)

    def add_image(
        self,
        layers: list[bytes],
        *,
        compression: str | list[str] = "gzip",
        config: dict | None = None,
        platform: tuple[str, str] = ("linux", "amd64"),
        docker: bool = False,
    ) -> dict:
        """Add an image from layer tars; returns its manifest descriptor."""
        compressions = compression if isinstance(compression, list) else [compression] * len(layers)
        style = "docker" if docker else "oci"
        layer_descs, diff_ids = [], []
        for tar, comp in zip(layers, compressions, strict=True):
            digest, size = self.add_blob(compress(tar, comp))
            layer_descs.append({"mediaType": _LAYER_TYPES[(style, comp)], "digest": digest, "size": size})
            diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
        return self.add_manifest(layer_descs, diff_ids, config=config, platform=platform, docker=docker)

    def add_manifest(
        self,
        layer_descs: list[dict],
        diff_ids: list[str],
        *,
        config: dict | None = None,
        platform: tuple[str, str] = ("linux", "amd64"),
        docker: bool = False,
    ) -> dict:
        """Add a manifest over blobs already added (descriptors and diff_ids as given, unchecked)."""
        config_doc = {
            "architecture": platform[1],
            "os": platform[0],
            "config": config or {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
        config_digest, config_size = self.add_blob(json.dumps(config_doc).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": mediatypes.DOCKER_MANIFEST if docker else mediatypes.OCI_MANIFEST,
            "config": {
                "mediaType": mediatypes.DOCKER_CONFIG if docker else mediatypes.OCI_CONFIG,
                "digest": config_digest,
                "size": config_size,
            },
            "layers": layer_descs,
        }
        digest, size = self.add_blob(json.dumps(manifest).encode())
        return {
            "mediaType": manifest["mediaType"],
            "digest": digest,
            "size": size,
            "platform": {"os": platform[0], "architecture": platform[1]},
        }

    def add_index(self, manifests: list[dict]) -> dict:
        """Add a multi-platform index of manifest descriptors; returns its descriptor."""
        index = {"schemaVersion": 2, "mediaType": mediatypes.OCI_INDEX, "manifests": manifests}
        digest, size = self.add_blob(json.dumps(index).encode())
        return {"mediaType": mediatypes.OCI_INDEX, "digest": digest, "size": size}

    def tag(self, descriptor: dict, tag: str) -> None:
        """Name a manifest or index in index.json, and write index.json."""
        entry = {k: v for k, v in descriptor.items() if k != "platform"}
        entry["annotations"] = {"org.opencontainers.image.ref.name": tag}
        self.tags = [t for t in self.tags if t["annotations"]["org.opencontainers.image.ref.name"] != tag] + [entry]
        (self.root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": self.tags}))
