"""The snapshotter's directories, laid out like containerd's overlayfs snapshotter.

    <root>/metadata.db            snapshot metadata (metadata.py)
    <root>/snapshots/<id>/fs      the snapshot's own files (upper dir while active)
    <root>/snapshots/<id>/work    overlay work dir (active snapshots only)
    <root>/snapshots/new-*        a snapshot being created (not yet in the database)
    <root>/snapshots/rm-<id>-*    a snapshot being removed (renamed away first)

A directory is "owned" when its name is the id of a snapshot in the database. The root and
snapshots/ are root's alone (0700, as containerd keeps its overlayfs snapshotter), and so
are metadata.db and the lock (0600): overlayfs and runc reach the layers as root.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

from layerstore.private import FILE_MODE, private_dir, restrict_file
from snapshotter.metadata import Kind, Snapshot

log = logging.getLogger(__name__)

NEW_PREFIX = "new-"
TRASH_PREFIX = "rm-"
_TRASH = re.compile(r"^rm-([0-9]+)-")


class Layout:
    """Paths and directory operations under one snapshotter root."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.snapshots = self.root / "snapshots"
        self.metadata_path = self.root / "metadata.db"
        self.lock_path = self.root / "lock"

    def ensure(self) -> None:
        """Make the root and snapshots/ private directories (0700) and the database and lock files 0600,
        creating what is missing and tightening what an older liftoff (or its FUSE daemon, which makes
        ROOT/remote) left open to others."""
        for directory in (self.root, self.snapshots):
            private_dir(directory)
        for path in (self.metadata_path, self.lock_path):
            os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE))  # SQLite gives -wal/-shm its mode
            restrict_file(path)
        for suffix in ("-wal", "-shm", "-journal"):
            journal = self.metadata_path.with_name(self.metadata_path.name + suffix)
            if journal.exists():
                restrict_file(journal)

    def snapshot_dir(self, snapshot_id: int) -> Path:
        return self.snapshots / str(snapshot_id)

    def upper_dir(self, snapshot_id: int) -> Path:
        """The directory holding the snapshot's own files (`fs`)."""
        return self.snapshot_dir(snapshot_id) / "fs"

    def work_dir(self, snapshot_id: int) -> Path:
        return self.snapshot_dir(snapshot_id) / "work"

    def lower_dir(self, snapshot: Snapshot) -> Path:
        """The directory that serves committed snapshot `snapshot` as an overlay lower layer.

        The one place that decides it: a snapshot whose files live elsewhere (a lazily
        fetched remote layer served by a FUSE mount) is answered here.
        """
        return self.upper_dir(snapshot.id)

    def lower_dirs(self, parents: Sequence[Snapshot]) -> list[Path]:
        """The overlay lower directories of a chain of committed snapshots (nearest first).

        One per snapshot here; a layout serving remote layers merges runs of them into one.
        """
        return [self.lower_dir(parent) for parent in parents]

    def make_new(self, kind: Kind, owner_of: Path | None) -> Path:
        """A fresh `new-*` directory with `fs` (0755, owned like `owner_of`) and, when active, `work` (0711)."""
        path = Path(tempfile.mkdtemp(prefix=NEW_PREFIX, dir=self.snapshots))
        fs = path / "fs"
        fs.mkdir(mode=0o755)
        os.chmod(fs, 0o755)  # not subject to the umask
        if owner_of is not None:
            st = os.stat(owner_of)
            os.lchown(fs, st.st_uid, st.st_gid)
        if kind == Kind.ACTIVE:
            (path / "work").mkdir(mode=0o711)
            os.chmod(path / "work", 0o711)
        return path

    def trash(self, path: Path, snapshot_id: int | None = None) -> Path:
        """Rename `path` to a `rm-*` name in the same directory (atomic); returns the new path."""
        tag = snapshot_id if snapshot_id is not None else "x"
        target = path.with_name(f"{TRASH_PREFIX}{tag}-{secrets.token_hex(4)}")
        os.rename(path, target)
        return target

    def entries(self) -> list[str]:
        """Names under snapshots/."""
        return sorted(os.listdir(self.snapshots))

    @staticmethod
    def trash_id(name: str) -> int | None:
        """The snapshot id a `rm-<id>-*` name was renamed from, or None."""
        match = _TRASH.match(name)
        return int(match.group(1)) if match else None

    @staticmethod
    def owner_id(name: str) -> int | None:
        """The snapshot id a live directory name stands for, or None for other names."""
        return int(name) if name.isdigit() else None


def delete_tree(path: Path) -> bool:
    """Delete a directory tree even where modes forbid it; returns whether it is gone."""

    def retry(func, failed: str, _exc) -> None:
        parent = os.path.dirname(failed)
        try:
            os.chmod(parent, stat.S_IRWXU)
            func(failed)
        except FileNotFoundError:
            pass

    try:
        shutil.rmtree(path, onerror=retry)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.error("cannot delete %s: %s; Cleanup will try again", path, e)
    return not path.exists()
