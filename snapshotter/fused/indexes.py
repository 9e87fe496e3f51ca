"""Layer indexes on local disk, as stored (zstd protobuf): written by the snapshotter at pull time,
read by the FUSE daemon to build views. A corrupt copy is fetched again from the stores
(snapshotter/index_copies.py)."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

from layerstore.errors import FormatError, LiftoffError
from layerstore.pb.liftoff.index.v1 import index_pb2 as pb
from layerstore.private import private_dir, restrict_file, write_private
from layerstore.stores import Store
from snapshotter.index_copies import decode_copy, fetch_again


class IndexDir:
    """Layer indexes under `root`, one file per layer named by its digest's hex."""

    def __init__(self, root: Path, stores: Sequence[Store] = ()) -> None:
        self.stores = list(stores)
        self.root = private_dir(root)
        for path in self.root.iterdir():
            restrict_file(path)  # indexes an older liftoff wrote world-readable

    def path(self, digest: str) -> Path:
        return self.root / digest.split(":", 1)[1]

    def has(self, digest: str) -> bool:
        return self.path(digest).exists()

    def put(self, digest: str, data: bytes) -> None:
        """Write an index atomically (concurrent writers of the same index each use their own temp file)."""
        target = self.path(digest)
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        tmp.unlink(missing_ok=True)  # left by a crash of a thread with the same identity
        write_private(tmp, data)
        os.rename(tmp, target)

    def load(self, digest: str, check_extents: bool = True) -> pb.LayerIndex:
        """The parsed index of layer `digest`; a corrupt copy is fetched again and replaced."""
        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError:
            raise LiftoffError(f"no local index for layer {digest}: pull the image again") from None
        try:
            return decode_copy(data, digest, f"local index of {digest}", check_extents)
        except FormatError as e:
            data, index = fetch_again(self.stores, digest, e, check_extents)
        self.put(digest, data)
        return index

    def digests(self) -> list[str]:
        """The layers with a local index (temp files of unfinished writes left out)."""
        return ["sha256:" + p.name for p in self.root.iterdir() if ".tmp-" not in p.name]

    def remove(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)
