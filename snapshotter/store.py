"""The snapshot operations over metadata and disk, independent of gRPC.

Every change is one metadata transaction, and the directory work that goes with it happens
inside that transaction, before it commits:

- create: make `new-*` (fs, work), insert the row, rename `new-*` to `<id>`, commit. A crash
  before the commit leaves a directory no row owns; it is removed at the next start (and the
  id, which SQLite may hand out again, finds its name free).
- remove: delete the row, rename `<id>` to `rm-<id>-*`, commit, then delete the tree. A crash
  before the commit leaves the row and a renamed directory; the next start renames it back.
  A live directory is therefore never half deleted.

Extension points (for lazy remote layers): Prepare requests go through `prepare_hooks` first;
a hook may answer a request itself (e.g. one labelled `containerd.io/snapshot.ref`: insert a
committed snapshot with `store.meta.write()` and raise AlreadyExists, containerd's handshake)
or return None to let the ordinary path (`create`) run. Which directory serves a committed
snapshot as a lower layer is decided by `Layout.lower_dir` alone: pass a `layout` subclass.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from layerstore.errors import LiftoffError
from snapshotter.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from snapshotter.filters import Filter, snapshot_fields
from snapshotter.keys import validate_key, validate_labels
from snapshotter.layout import NEW_PREFIX, TRASH_PREFIX, Layout, delete_tree
from snapshotter.metadata import Kind, Metadata, Snapshot
from snapshotter.mounts import Mount, OverlayFeatures, build_mounts, detect_overlay_features
from snapshotter.usage import disk_usage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareRequest:
    """A Prepare (kind ACTIVE) or View (kind VIEW) request, validated."""

    namespace: str
    key: str
    parent: str
    kind: Kind
    labels: dict[str, str] = field(default_factory=dict)


PrepareHook = Callable[["SnapshotStore", PrepareRequest], "list[Mount] | None"]
RemovedHook = Callable[["SnapshotStore", list[Snapshot]], None]


def _where(namespace: str) -> str:
    return f" in namespace {namespace!r}" if namespace else ""


class SnapshotStore:
    """All snapshots under one root: the containerd snapshotter operations."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        features: OverlayFeatures | None = None,
        prepare_hooks: Sequence[PrepareHook] = (),
        layout: Layout | None = None,
        removed_hooks: Sequence[RemovedHook] = (),
    ) -> None:
        self.layout = layout or Layout(root)
        self.layout.ensure()
        self._lock_file = _lock_root(self.layout)
        self.meta = Metadata(self.layout.metadata_path)
        self.features = features if features is not None else detect_overlay_features()
        self.prepare_hooks = list(prepare_hooks)
        self.removed_hooks = list(removed_hooks)  # told which snapshots a Remove took away
        self._deleting: set[str] = set()
        self.recover()

    # -- Prepare / View -------------------------------------------------------------------

    def prepare(self, request: PrepareRequest) -> list[Mount]:
        """Prepare or View: hooks first, then the ordinary path."""
        validate_key(request.key)
        if request.parent:
            validate_key(request.parent, "parent")
        validate_labels(request.labels)
        for hook in self.prepare_hooks:
            mounts = hook(self, request)
            if mounts is not None:
                return mounts
        return self.create(request)

    def create(self, request: PrepareRequest) -> list[Mount]:
        """Create an active snapshot or a view on disk and in the metadata; returns its mounts."""
        ns, key = request.namespace, request.key
        temp: Path | None = None
        placed: Path | None = None
        try:
            with self.meta.write() as tx:
                if tx.get(ns, key) is not None:
                    raise AlreadyExists(f"snapshot {key!r} already exists{_where(ns)}")
                parent, chain = None, []
                if request.parent:
                    parent = tx.get(ns, request.parent)
                    if parent is None:
                        raise NotFound(f"parent snapshot {request.parent!r} does not exist{_where(ns)}")
                    if parent.kind != Kind.COMMITTED:
                        raise InvalidArgument(
                            f"parent {request.parent!r} is {parent.kind.label}; only committed snapshots can be parents"
                        )
                    chain = tx.chain(parent.id)
                temp = self.layout.make_new(request.kind, self.layout.lower_dir(parent) if parent else None)
                sid = tx.insert(ns, key, request.kind, parent.id if parent else None, request.labels)
                target = self.layout.snapshot_dir(sid)
                if os.path.lexists(target):
                    # Left by a create that crashed before its commit: nothing owns it.
                    log.warning("removing stale directory %s left by an interrupted prepare", target)
                    delete_tree(self.layout.trash(target, sid))
                os.rename(temp, target)
                placed, temp = target, None
                snapshot = tx.get(ns, key)
        except BaseException:
            for path in (placed, temp):
                if path is not None:
                    delete_tree(path)
            raise
        assert snapshot is not None
        log.info("%s %r%s parent=%r -> id %d", request.kind.label, key, _where(ns), request.parent, snapshot.id)
        return self._mounts(snapshot, chain)

    # -- Mounts / Stat / Usage ----------------------------------------------------------

    def get(self, namespace: str, key: str) -> Snapshot:
        """The snapshot, or NotFound."""
        validate_key(key)
        snapshot = self.meta.get(namespace, key)
        if snapshot is None:
            raise NotFound(f"snapshot {key!r} does not exist{_where(namespace)}")
        return snapshot

    def mounts(self, namespace: str, key: str) -> list[Mount]:
        """The mounts of an active snapshot or view."""
        snapshot = self.get(namespace, key)
        if snapshot.kind == Kind.COMMITTED:
            raise FailedPrecondition(f"snapshot {key!r} is committed; only active snapshots and views have mounts")
        return self._mounts(snapshot, self.meta.chain(snapshot.parent_id) if snapshot.parent_id else [])

    def _mounts(self, snapshot: Snapshot, parents: list[Snapshot]) -> list[Mount]:
        return build_mounts(
            snapshot,
            parents,
            self.layout.upper_dir(snapshot.id),
            self.layout.work_dir(snapshot.id),
            self.layout.lower_dirs,
            self.features,
        )

    def usage(self, namespace: str, key: str) -> tuple[int, int]:
        """(bytes, inodes) the snapshot uses itself: measured at commit, walked for active ones."""
        snapshot = self.get(namespace, key)
        if snapshot.kind == Kind.ACTIVE:
            try:
                return disk_usage(self.layout.upper_dir(snapshot.id))
            except FileNotFoundError:
                raise NotFound(f"snapshot {key!r} was removed while its usage was measured") from None
        return snapshot.size, snapshot.inodes

    def list(self, namespace: str | None, selected: Filter) -> Iterator[Snapshot]:
        """Snapshots of `namespace` (every namespace when None) that match the filter."""
        for snapshot in self.meta.list(namespace):
            if selected.match(snapshot_fields(snapshot.key, snapshot.parent, snapshot.kind.label, snapshot.labels)):
                yield snapshot

    # -- Commit / Update / Remove ---------------------------------------------------------

    def commit(self, namespace: str, name: str, key: str, labels: dict[str, str]) -> Snapshot:
        """Commit active snapshot `key` as `name`; its usage is measured now and stored."""
        validate_key(name, "name")
        validate_key(key)
        validate_labels(labels)
        active = self._commit_checks(self.meta, namespace, name, key)
        size, inodes = disk_usage(self.layout.upper_dir(active.id))
        with self.meta.write() as tx:
            active = self._commit_checks(tx, namespace, name, key)
            tx.commit_active(active.id, name, labels, size, inodes)
            committed = tx.get(namespace, name)
        assert committed is not None
        log.info("commit %r as %r%s (id %d, %d bytes, %d inodes)", key, name, _where(namespace), active.id, size, inodes)
        return committed

    @staticmethod
    def _commit_checks(reader, namespace: str, name: str, key: str) -> Snapshot:
        if reader.get(namespace, name) is not None:
            raise AlreadyExists(f"snapshot {name!r} already exists{_where(namespace)}")
        active = reader.get(namespace, key)
        if active is None:
            raise NotFound(f"snapshot {key!r} does not exist{_where(namespace)}")
        if active.kind != Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {key!r} is {active.kind.label}; only active snapshots can be committed")
        return active

    def update(self, namespace: str, key: str, labels: dict[str, str], paths: Sequence[str]) -> Snapshot:
        """Update labels: all of them (no paths, or "labels") or single ones ("labels.<key>"; empty value deletes)."""
        validate_key(key)
        with self.meta.write() as tx:
            snapshot = tx.get(namespace, key)
            if snapshot is None:
                raise NotFound(f"snapshot {key!r} does not exist{_where(namespace)}")
            updated = dict(labels) if not paths else dict(snapshot.labels)
            for path in paths:
                if path == "labels":
                    updated = dict(labels)
                elif path.startswith("labels."):
                    label = path.removeprefix("labels.")
                    updated[label] = labels.get(label, "")
                else:
                    raise InvalidArgument(
                        f"cannot update field {path!r} of snapshot {key!r}: only labels can change"
                        " (mask paths 'labels' or 'labels.<key>')"
                    )
            # Like containerd, check the labels the snapshot ends up with, not those the mask leaves out.
            tx.set_labels(snapshot.id, validate_labels({k: v for k, v in updated.items() if v != ""}))
            result = tx.get(namespace, key)
        assert result is not None
        return result

    def remove(self, namespace: str, key: str) -> None:
        """Remove a snapshot without children: row and directory."""
        validate_key(key)
        trash: Path | None = None
        live: Path | None = None
        try:
            with self.meta.write() as tx:
                snapshot = tx.get(namespace, key)
                if snapshot is None:
                    raise NotFound(f"snapshot {key!r} does not exist{_where(namespace)}")
                if tx.has_children(snapshot.id):
                    raise FailedPrecondition(f"snapshot {key!r} has children; remove them first")
                tx.delete(snapshot.id)
                live = self.layout.snapshot_dir(snapshot.id)
                try:
                    trash = self.layout.trash(live, snapshot.id)
                    self._deleting.add(trash.name)
                except FileNotFoundError:
                    log.warning("snapshot %r (id %d) had no directory %s", key, snapshot.id, live)
        except BaseException:
            if trash is not None and live is not None:
                os.rename(trash, live)  # the row is still there: put its directory back
                self._deleting.discard(trash.name)
            raise
        log.info("remove %r%s (id %d)", key, _where(namespace), snapshot.id)
        if trash is not None:
            delete_tree(trash)
            self._deleting.discard(trash.name)
        for hook in self.removed_hooks:
            try:
                hook(self, [snapshot])
            except Exception:
                log.exception("after removing %r", key)

    # -- Cleanup and recovery -------------------------------------------------------------

    def cleanup(self) -> int:
        """Delete every directory under snapshots/ that no snapshot owns; returns how many."""
        victims: list[Path] = []
        with self.meta.write() as tx:
            owned = tx.ids()
            for name in self.layout.entries():
                if name in self._deleting or self.layout.owner_id(name) in owned:
                    continue
                path = self.layout.snapshots / name
                if not name.startswith(TRASH_PREFIX):
                    path = self.layout.trash(path, self.layout.owner_id(name))
                self._deleting.add(path.name)
                victims.append(path)
        for path in victims:
            delete_tree(path)
            self._deleting.discard(path.name)
        if victims:
            log.info("cleanup removed %d unowned directories", len(victims))
        return len(victims)

    def recover(self) -> None:
        """Finish what a crash interrupted: put back directories of removals that did not commit, drop the rest."""
        with self.meta.write() as tx:
            owned = tx.ids()
            for name in self.layout.entries():
                sid = self.layout.trash_id(name)
                if sid in owned and not os.path.lexists(self.layout.snapshot_dir(sid)):
                    os.rename(self.layout.snapshots / name, self.layout.snapshot_dir(sid))
                    log.warning("restored the directory of snapshot id %d: its removal was interrupted before commit", sid)
                elif name.startswith(NEW_PREFIX):
                    log.warning("dropping %s: a prepare interrupted before commit", name)
            missing = sorted(sid for sid in owned if not self.layout.snapshot_dir(sid).is_dir())
        if missing:
            log.error("snapshot ids %s have no directory under %s; their mounts will fail", missing, self.layout.snapshots)
        self.cleanup()
        problems = self.meta.check()
        if problems:
            raise LiftoffError(f"snapshot metadata {self.layout.metadata_path} is damaged: {'; '.join(problems[:5])}")

    def close(self) -> None:
        """Close the database and release the root."""
        self.meta.close()
        self._lock_file.close()


def _lock_root(layout: Layout):
    """Hold an exclusive lock on the root for this process's lifetime: one snapshotter per root."""
    handle = open(layout.lock_path, "a+")  # noqa: SIM115 - held until close()
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise LiftoffError(
            f"another liftoff snapshotter is using {layout.root} (it holds {layout.lock_path}); stop it or use another --root"
        ) from None
    return handle
