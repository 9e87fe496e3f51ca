"""View lifecycle: mount a merged view of remote layers, record it in views/<id>.json, unmount it,
and at start take every recorded view back (from local indexes alone, so without a store).

A mounted view's /dev/fuse descriptor is also kept in the fd store (fdstore.py), and its record
holds what INIT negotiated and a digest of its inode table. A new daemon that finds both
re-attaches to the same connection: running containers keep their mounts and the kernel
queues again what the old daemon left unanswered. Inode numbers are assigned by a walk of the
tree merged from the indexes (fuse_tree.View._number), so the same indexes give the same
numbers; the digest proves it before a connection is re-attached. A view whose rebuilt table
differs is never served on its old connection (the kernel would get other files for the inode
numbers it holds): the connection is ended (its readers get ENOTCONN at once instead of wrong
bytes or ESTALE) and the view is mounted afresh for new containers."""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from layerstore.errors import LiftoffError
from layerstore.fetch import ChunkFetcher
from layerstore.private import private_dir, restrict_file, write_private
from snapshotter.erofs_image import BlobLayout, ErofsUnsupported, write_image
from snapshotter.fuse_blob import BLOB_NAME, BlobView
from snapshotter.fuse_control import view_id as make_view_id
from snapshotter.fuse_passthrough import BackingFiles
from snapshotter.fuse_server import MOUNT_FLAGS, FuseSession, OnRead, lazy_unmount, mount_erofs
from snapshotter.fuse_tree import View
from snapshotter.fused.fdstore import FdStore
from snapshotter.fused.indexes import IndexDir
from snapshotter.page_fill import PageFill

log = logging.getLogger(__name__)


class _KernelRefused(OSError):
    """The kernel would not mount an EROFS image (it holds for every view)."""


@dataclass(frozen=True)
class ViewSpec:
    """What a view is: its layers (bottom first) and whether local layers lie below them."""

    view_id: str
    layers: list[str]
    layers_below: bool


_NODE = struct.Struct("<QIQIIIqQI")
_CHILD = struct.Struct("<IQ")


def inode_digest(view: View) -> str:
    """A digest of everything the kernel may hold about the view's inodes (numbers, types, sizes,
    owners, times, link counts, names in each directory): equal digests, same answers."""
    parts = []
    pack, entry = _NODE.pack, _CHILD.pack
    for node in view.nodes[1:]:
        if node is None:
            continue
        children = node.children
        parts.append(
            pack(node.ino, node.mode, node.size, node.uid, node.gid, node.nlink, node.mtime_ns, node.rdev, len(children or ()))
        )
        if children:
            parts.extend(entry(len(name), child.ino) + name for name, child in children.items())
    return hashlib.sha256(b"".join(parts)).hexdigest()


@dataclass
class Record:
    """A view's record, views/<id>.json: the view, and what a new daemon needs to re-attach to its connection."""

    spec: ViewSpec
    init: dict | None = None  # what INIT negotiated (FuseSession.init_state)
    inodes: str = ""  # inode_digest of the view served
    erofs: bool = False  # served as an EROFS image whose blob is the FUSE connection


class MountedView:
    """A view being served by its FuseSession: the tree itself, or (`erofs`) the blob beneath the
    view's EROFS image, mounted at `mountpoint` over the session's own mount."""

    def __init__(
        self, spec: ViewSpec, view: View, mountpoint: Path, session: FuseSession, inodes: str = "", erofs: bool = False
    ) -> None:
        self.spec = spec
        self.id = spec.view_id
        self.view = view
        self.mountpoint = mountpoint
        self.session = session
        self.inodes = inodes
        self.erofs = erofs
        self.on_read: OnRead | None = None
        self.fill: PageFill | None = None  # the page cache being filled for a start (daemon.mount)

    def alive(self) -> bool:
        return self.session.alive()

    def record_reads(self, on_read: OnRead | None) -> None:
        """Report each read of the view's files as (file, offset, length); None stops it. Reads of an
        EROFS view's blob are reported as the files they cover."""
        self.on_read = on_read
        if on_read is None or not self.erofs:
            self.session.on_read = on_read
            return
        blob = self.session.view
        assert isinstance(blob, BlobView)

        def on_blob_read(_node, offset: int, length: int) -> None:
            for file, start, size in blob.files_in(offset, length):
                on_read(file, start, size)

        self.session.on_read = on_blob_read


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
        fd_store: FdStore | None = None,
        resend: bool = True,
        backing: BackingFiles | None = None,
        erofs: bool = False,
    ) -> None:
        self.indexes = indexes
        self.fetcher = fetcher
        self.fetch_pool = fetch_pool
        self.max_readahead = max_readahead
        self.fd_store = fd_store or FdStore()
        self.resend = resend
        self.backing = backing  # None: no passthrough offered to new connections (--no-passthrough)
        self.resent = 0  # connections whose unanswered requests were queued again at attach
        self.records = private_dir(root / "views")
        for path in self.records.iterdir():
            restrict_file(path)  # view records an older liftoff wrote world-readable
        self.mnt = private_dir(root / "mnt")
        self.erofs = erofs  # new views as EROFS images over a FUSE blob (where the kernel mounts them)
        self.images = private_dir(root / "erofs")
        self._views: dict[str, MountedView] = {}
        self._lock = threading.RLock()

    def recorded(self) -> Iterator[Record | tuple[str, Exception]]:
        """The views recorded in views/ (what to serve at start), or (name, error) for an unreadable record."""
        for path in sorted(self.records.glob("*.json")):
            try:
                doc = json.loads(path.read_text())
                spec = ViewSpec(doc["view"], list(doc["layers"]), bool(doc["layers_below"]))
                init = doc.get("init")
                if init is not None:
                    init = {
                        "minor": int(init["minor"]),
                        "flags": int(init["flags"]),
                        "resend": bool(init["resend"]),
                        "passthrough": bool(init.get("passthrough", False)),
                    }
                yield Record(spec, init, str(doc.get("inodes", "")), bool(doc.get("erofs", False)))
            except (OSError, ValueError, KeyError, TypeError) as e:
                yield path.stem, e

    def attach(self, record: Record, fd: int) -> MountedView | None:
        """Serve a recorded view on the connection an earlier daemon left (`fd`); None, with the
        connection ended, where that cannot be done safely (then mount() it afresh)."""
        spec = record.spec
        with self._lock:
            mountpoint = self.mnt / spec.view_id
            fuse_mountpoint = self._blob_dir(spec.view_id) if record.erofs else mountpoint
            why = None
            view = None
            if record.init is None or not record.inodes:
                why = "its record has no INIT state (written by an older liftoff)"
            elif str(fuse_mountpoint) not in _fuse_mounts():
                why = f"nothing is mounted at {fuse_mountpoint} any more"
            else:
                view = self._build(spec)
                digest = inode_digest(view)
                if digest != record.inodes:
                    why = f"its inode table rebuilt from the local indexes differs ({digest[:12]}, recorded {record.inodes[:12]})"
            if why is not None or view is None:
                log.error(
                    "view %s: not re-attaching its FUSE connection: %s; ending it and mounting the view afresh", spec.view_id, why
                )
                self._forget_fd(spec.view_id, fd)
                return None
            session = self._blob_session(view, spec.view_id) if record.erofs else self._session(view, spec.view_id)
            session.on_gone = self._gone
            assert record.init is not None
            if session.attach(fd, fuse_mountpoint, record.init, self.resend):
                self.resent += 1
            mounted = self._views[spec.view_id] = MountedView(spec, view, mountpoint, session, record.inodes, record.erofs)
            if record.erofs and str(mountpoint) not in _mounts(b"erofs"):
                try:  # the blob's connection lived on, the image's mount did not: mount it again
                    self._mount_image(spec.view_id, session.view)  # type: ignore[arg-type]
                except (OSError, ErofsUnsupported) as e:
                    log.error("view %s: its EROFS image cannot be mounted again: %s", spec.view_id, e)
            try:
                self.fd_store.put(spec.view_id, fd)  # a store that restarted meanwhile (or a handover) has it again
            except LiftoffError as e:
                log.warning("view %s: %s", spec.view_id, e)
            log.info("re-attached view %s (%d inodes) at %s", spec.view_id, len(view.nodes) - 1, mountpoint)
            self._settle()
            return mounted

    def _build(self, spec: ViewSpec) -> View:
        """The view's tree, built from the local indexes with the cyclic garbage collector paused:
        the tens of thousands of nodes it allocates would otherwise set off full collections."""
        paused = gc.isenabled()
        gc.disable()
        try:
            # each file's extents are checked when it is first read (View.spans): a start reads few
            return View([self.indexes.load(d, check_extents=False) for d in spec.layers], spec.layers_below)
        finally:
            if paused:
                gc.enable()

    @staticmethod
    def _settle() -> None:
        """Move every object alive now (the views' trees above all) out of the collector's sight, so
        that collections while serving do not walk them again and again; unmount() gives them back."""
        gc.freeze()

    def _session(self, view: View, view_id: str) -> FuseSession:
        """A session for the view; its inode states (passthrough) live next to its record. A connection
        that negotiated passthrough keeps it after a restart with --no-passthrough: the kernel holds it."""
        return FuseSession(
            view,
            self.fetcher,
            view_id,
            self.fetch_pool,
            max_readahead=self.max_readahead,
            backing=self.backing,
            states_path=self.records / f"{view_id}.inodes",
        )

    def _forget_fd(self, view_id: str, fd: int) -> None:
        """Drop a connection: out of the store, and our descriptor closed (the last one ends it)."""
        try:
            self.fd_store.remove(view_id)
        except LiftoffError as e:
            log.warning("view %s: %s", view_id, e)
        try:
            os.close(fd)
        except OSError:
            pass

    def _gone(self, session: FuseSession) -> None:
        """A connection ended (unmounted and unused, or aborted): nothing keeps its descriptor any more."""
        with self._lock:
            mounted = self._views.get(session.label)
            if mounted is not None and mounted.session is not session:  # mounted again meanwhile: the name is its
                os.close(session.fd)
                return
            self._views.pop(session.label, None)
            self._forget_fd(session.label, session.fd)
        gc.unfreeze()
        log.info("view %s: its FUSE connection ended", session.label)

    def stop_all(self, timeout: float) -> tuple[dict[str, int], int]:
        """Stop serving every view without unmounting (a handover); returns their descriptors by
        view id and how many reads in flight were left unanswered (the next daemon has them resent)."""
        with self._lock:
            views = list(self._views.values())
        unanswered = 0
        for mounted in views:
            mounted.session.on_gone = None
            unanswered += mounted.session.stop_serving(timeout)
        return {m.id: m.session.fd for m in views}, unanswered

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
            view = self._build(spec)
            mountpoint = self.mnt / spec.view_id
            self._clear_stale(mountpoint)
            mountpoint.mkdir(mode=0o700, exist_ok=True)
            mounted = self._mount_erofs(spec, view) if self.erofs else None
            if mounted is None:
                session = self._serve(self._session(view, spec.view_id), mountpoint, f"view {spec.view_id}")
                mounted = MountedView(spec, view, mountpoint, session, inode_digest(view))
            session = mounted.session
            self._views[spec.view_id] = mounted
            self._write_record(Record(spec, session.init_state(), mounted.inodes, mounted.erofs))
            try:
                self.fd_store.put(spec.view_id, session.fd)
            except LiftoffError as e:
                log.warning("view %s: %s: it will not survive a restart of this daemon", spec.view_id, e)
            log.info(
                "mounted view %s (%d layers, %d inodes%s) at %s in %.3f s",
                spec.view_id,
                len(spec.layers),
                len(view.nodes) - 1,
                ", EROFS" if mounted.erofs else "",
                mountpoint,
                time.monotonic() - started,
            )
            self._settle()
            return mounted, True

    def _serve(self, session: FuseSession, mountpoint: Path, what: str) -> FuseSession:
        """Mount the session at `mountpoint` and serve it until its connection ends."""
        session.on_gone = self._gone
        try:
            session.mount(mountpoint)
        except OSError as e:
            raise LiftoffError(f"mounting {what} at {mountpoint} failed: {e}") from None
        return session

    def _blob_dir(self, view_id: str) -> Path:
        return self.mnt / f"{view_id}.blob"

    def _blob_session(self, view: View, view_id: str) -> FuseSession:
        """A session serving the view's blob (read with direct I/O by EROFS where the kernel can)."""
        return FuseSession(BlobView(view, BlobLayout(view)), self.fetcher, view_id, self.fetch_pool)

    def _clear_stale(self, path: Path) -> None:
        if str(path) in _fuse_mounts() or str(path) in _mounts(b"erofs") or _is_stale(path):
            log.warning("clearing a stale mount at %s", path)
            lazy_unmount(path)

    def _mount_erofs(self, spec: ViewSpec, view: View) -> MountedView | None:
        """Mount the view as an EROFS image over its blob; None where that cannot be done, and the view
        is served by FUSE: one log line says why. Where the kernel refuses the mount, every later view
        is served by FUSE too; where only this view's image cannot be written, only this one."""
        blob_dir = self._blob_dir(spec.view_id)
        self._clear_stale(blob_dir)
        blob_dir.mkdir(mode=0o700, exist_ok=True)
        session = self._serve(self._blob_session(view, spec.view_id), blob_dir, f"the blob of view {spec.view_id}")
        try:
            self._mount_image(spec.view_id, session.view)  # type: ignore[arg-type]
        except (OSError, ErofsUnsupported) as e:
            if isinstance(e, _KernelRefused):
                self.erofs = False
                log.error("view %s: no EROFS view (%s): this and later views are served by FUSE", spec.view_id, e)
            else:
                log.warning("view %s: no EROFS view (%s): it is served by FUSE", spec.view_id, e)
            session.unmount()
            blob_dir.rmdir()
            (self.images / f"{spec.view_id}.img").unlink(missing_ok=True)
            return None
        return MountedView(spec, view, self.mnt / spec.view_id, session, inode_digest(view), erofs=True)

    def _mount_image(self, view_id: str, blob: BlobView) -> None:
        """Write the view's EROFS image and mount it (file-backed, Linux 6.12+) over its blob;
        _KernelRefused where the kernel will not mount it."""
        image = self.images / f"{view_id}.img"
        write_image(blob.view, blob.layout, image)
        try:
            direct = mount_erofs(image, self._blob_dir(view_id) / BLOB_NAME.decode(), self.mnt / view_id, MOUNT_FLAGS)
        except OSError as e:
            raise _KernelRefused(e.errno, e.strerror) from None
        if not direct:
            log.info("view %s: EROFS without direct I/O on this kernel: its blob is read through the page cache", view_id)

    def _write_record(self, record: Record) -> None:
        spec = record.spec
        path = self.records / f"{spec.view_id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)  # left by a crash (written under the lock)
        doc = {
            "view": spec.view_id,
            "layers": spec.layers,
            "layers_below": spec.layers_below,
            "init": record.init,
            "inodes": record.inodes,
            "erofs": record.erofs,
        }
        write_private(tmp, json.dumps(doc).encode())
        os.rename(tmp, path)

    def unmount(self, view_id: str) -> None:
        """Detach a view (containers still using it keep it until they stop, while this daemon runs)
        and forget it."""
        with self._lock:
            mounted = self._views.pop(view_id, None)
            if mounted is not None and mounted.fill is not None:
                mounted.fill.stop.set()
            (self.records / f"{view_id}.json").unlink(missing_ok=True)
            (self.records / f"{view_id}.inodes").unlink(missing_ok=True)
            if mounted is None:
                try:
                    self.fd_store.remove(view_id)
                except LiftoffError as e:
                    log.warning("view %s: %s", view_id, e)
            mountpoint = mounted.mountpoint if mounted else self.mnt / view_id
            for path in (mountpoint, self._blob_dir(view_id)):  # the view (FUSE or EROFS), then its blob
                if str(path) in _fuse_mounts() or str(path) in _mounts(b"erofs") or _is_stale(path):
                    lazy_unmount(path)
                try:
                    path.rmdir()
                except OSError:
                    pass
            (self.images / f"{view_id}.img").unlink(missing_ok=True)
        gc.unfreeze()  # a view's session and tree hold reference cycles: collectable again
        log.info("unmounted view %s", view_id)

    def detach_all(self) -> None:
        """Unmount every view, keeping their records (the next start mounts them again)."""
        with self._lock:
            for mounted in self._views.values():
                for path in (mounted.mountpoint, self._blob_dir(mounted.id)) if mounted.erofs else (mounted.mountpoint,):
                    try:
                        lazy_unmount(path)
                    except OSError as e:
                        log.warning("unmounting %s: %s", path, e)
                try:
                    self.fd_store.remove(mounted.id)
                except LiftoffError as e:
                    log.warning("view %s: %s", mounted.id, e)
            self._views.clear()


def _fuse_mounts() -> set[str]:
    """Mount points of liftoff's FUSE views in this mount namespace (from /proc: no stat of a view,
    which would wait for a daemon that is not serving it yet)."""
    return _mounts(b"fuse.liftoff")


def _mounts(fstype: bytes) -> set[str]:
    """Mount points of file systems of one type in this mount namespace, from /proc/self/mountinfo."""
    out = set()
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            sep = fields.index(b"-")
            if fields[sep + 1] == fstype:
                out.add(fields[4].decode("unicode_escape").encode("latin-1").decode("utf-8", "surrogateescape"))
    return out
