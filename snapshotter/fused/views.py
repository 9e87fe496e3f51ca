"""View lifecycle: mount a merged view of remote layers, record it in views/<id>.json, unmount it,
and mount every recorded view again at start (from local indexes alone, so without a store)."""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from layerstore.errors import LiftoffError
from layerstore.fetch import ChunkFetcher
from layerstore.private import private_dir, restrict_file, write_private
from snapshotter.fuse_control import view_id as make_view_id
from snapshotter.fuse_server import FuseSession, lazy_unmount
from snapshotter.fuse_tree import View
from snapshotter.fused.indexes import IndexDir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ViewSpec:
    """What a view is: its layers (bottom first) and whether local layers lie below them."""

    view_id: str
    layers: list[str]
    layers_below: bool


class MountedView:
    """A view being served by its FuseSession."""

    def __init__(self, spec: ViewSpec, view: View, mountpoint: Path, session: FuseSession) -> None:
        self.spec = spec
        self.id = spec.view_id
        self.view = view
        self.mountpoint = mountpoint
        self.session = session

    def alive(self) -> bool:
        return self.session.alive()


def _is_stale(path: Path) -> bool:
    """A mount point whose FUSE server is gone (ENOTCONN)."""
    try:
        os.stat(path)
        return False
    except OSError as e:
        return e.errno == errno.ENOTCONN


class Views:
    """The mounted views, their mount points under mnt/ and their records under views/."""

    def __init__(
        self,
        root: Path,
        indexes: IndexDir,
        fetcher: ChunkFetcher,
        fetch_pool: ThreadPoolExecutor,
        max_readahead: int = 128 << 10,
    ) -> None:
        self.indexes = indexes
        self.fetcher = fetcher
        self.fetch_pool = fetch_pool
        self.max_readahead = max_readahead
        self.records = private_dir(root / "views")
        for path in self.records.iterdir():
            restrict_file(path)  # view records an older liftoff wrote world-readable
        self.mnt = private_dir(root / "mnt")
        self._views: dict[str, MountedView] = {}
        self._lock = threading.RLock()

    def recorded(self) -> Iterator[ViewSpec | tuple[str, Exception]]:
        """The views recorded in views/ (what to mount at start), or (name, error) for an unreadable record."""
        for path in sorted(self.records.glob("*.json")):
            try:
                spec = json.loads(path.read_text())
                yield ViewSpec(spec["view"], list(spec["layers"]), bool(spec["layers_below"]))
            except (OSError, ValueError, KeyError, TypeError) as e:
                yield path.stem, e

    def get(self, view_id: str) -> MountedView | None:
        with self._lock:
            return self._views.get(view_id)

    def all(self) -> list[MountedView]:
        with self._lock:
            return list(self._views.values())

    def mount(self, spec: ViewSpec) -> tuple[MountedView, bool]:
        """Mount the view unless it is mounted and served; returns it and whether this call mounted it."""
        if spec.view_id != make_view_id(spec.layers, spec.layers_below):
            raise LiftoffError(f"view id {spec.view_id} does not match its layers")
        with self._lock:
            mounted = self._views.get(spec.view_id)
            if mounted is not None and mounted.alive():
                return mounted, False
            started = time.monotonic()
            view = View([self.indexes.load(d) for d in spec.layers], spec.layers_below)
            mountpoint = self.mnt / spec.view_id
            if _is_stale(mountpoint) or os.path.ismount(mountpoint):
                log.warning("clearing a stale mount at %s", mountpoint)
                lazy_unmount(mountpoint)
            mountpoint.mkdir(mode=0o700, exist_ok=True)
            session = FuseSession(view, self.fetcher, spec.view_id, self.fetch_pool, max_readahead=self.max_readahead)
            try:
                session.mount(mountpoint)
            except OSError as e:
                raise LiftoffError(f"mounting view {spec.view_id} at {mountpoint} failed: {e}") from None
            mounted = self._views[spec.view_id] = MountedView(spec, view, mountpoint, session)
            self._write_record(spec)
            log.info(
                "mounted view %s (%d layers, %d inodes) at %s in %.3f s",
                spec.view_id,
                len(spec.layers),
                len(view.nodes) - 1,
                mountpoint,
                time.monotonic() - started,
            )
            return mounted, True

    def _write_record(self, spec: ViewSpec) -> None:
        path = self.records / f"{spec.view_id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)  # left by a crash (written under the lock)
        record = {"view": spec.view_id, "layers": spec.layers, "layers_below": spec.layers_below}
        write_private(tmp, json.dumps(record).encode())
        os.rename(tmp, path)

    def unmount(self, view_id: str) -> None:
        """Detach a view (containers still using it keep it until they stop) and forget it."""
        with self._lock:
            mounted = self._views.pop(view_id, None)
            (self.records / f"{view_id}.json").unlink(missing_ok=True)
            mountpoint = mounted.mountpoint if mounted else self.mnt / view_id
            if os.path.ismount(mountpoint) or _is_stale(mountpoint):
                lazy_unmount(mountpoint)
            try:
                mountpoint.rmdir()
            except OSError:
                pass
        log.info("unmounted view %s", view_id)

    def detach_all(self) -> None:
        """Unmount every view, keeping their records (the next start mounts them again)."""
        with self._lock:
            for mounted in self._views.values():
                try:
                    lazy_unmount(mounted.mountpoint)
                except OSError as e:
                    log.warning("unmounting %s: %s", mounted.mountpoint, e)
            self._views.clear()
