"""Snapshot metadata in SQLite: one writer, WAL, every change one crash-safe transaction.

Tables: `snapshots` (numeric id, namespace, key, kind, parent id, timestamps, the usage of
committed snapshots) and `labels`. Keys are unique per namespace. A snapshot's parent is a
foreign key that refuses deletion while children exist, so the database itself can never
hold a dangling parent. Ids come from AUTOINCREMENT; a crash before commit may hand the same
id out again, which the disk layer handles (see store.py).

Writers serialize on one connection behind a lock (`write()`); readers use a connection per
thread and see the last committed state (WAL lets them run while a write is in progress).
"""

from __future__ import annotations

import enum
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from layerstore.errors import LiftoffError
from snapshotter.keys import backend_namespace

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace   TEXT    NOT NULL,
    key         TEXT    NOT NULL,
    kind        INTEGER NOT NULL CHECK (kind IN (1, 2, 3)),
    parent_id   INTEGER REFERENCES snapshots(id) ON DELETE RESTRICT,
    created_ns  INTEGER NOT NULL,
    updated_ns  INTEGER NOT NULL,
    size        INTEGER NOT NULL DEFAULT 0,
    inodes      INTEGER NOT NULL DEFAULT 0,
    UNIQUE (namespace, key)
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
CREATE TABLE IF NOT EXISTS labels (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    key         TEXT    NOT NULL,
    value       TEXT    NOT NULL,
    PRIMARY KEY (snapshot_id, key)
) WITHOUT ROWID;
"""

_SELECT = """
SELECT s.id, s.namespace, s.key, s.kind, s.parent_id, COALESCE(p.key, ''), s.created_ns, s.updated_ns, s.size, s.inodes
FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id
"""


class Kind(enum.IntEnum):
    """Snapshot kinds, numbered as containerd's API numbers them."""

    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    @property
    def label(self) -> str:
        """The name containerd's filters use: view, active, committed."""
        return self.name.lower()


@dataclass
class Snapshot:
    """One snapshot's metadata. `parent` is the parent's key ("" for none)."""

    id: int
    namespace: str
    key: str
    kind: Kind
    parent_id: int | None
    parent: str
    created_ns: int
    updated_ns: int
    size: int = 0
    inodes: int = 0
    labels: dict[str, str] = field(default_factory=dict)


class MetadataError(LiftoffError):
    """The metadata database cannot be opened or is not ours."""


def _row(row: tuple) -> Snapshot:
    sid, ns, key, kind, parent_id, parent, created, updated, size, inodes = row
    return Snapshot(sid, ns, key, Kind(kind), parent_id, parent, created, updated, size, inodes)


class _Reader:
    """Queries shared by the read connections and the write transaction."""

    conn: sqlite3.Connection

    @contextmanager
    def _consistent(self) -> Iterator[None]:
        """Run several SELECTs against one committed state."""
        if self.conn.in_transaction:
            yield
            return
        self.conn.execute("BEGIN")
        try:
            yield
        finally:
            self.conn.execute("COMMIT")

    def get(self, namespace: str, key: str) -> Snapshot | None:
        """The snapshot `key` in `namespace`, with its labels, or None.

        A backend key names its own namespace (`<ns>/<seq>/...`). containerd shares a remote
        snapshot committed in one namespace with another that pulls the same layer (its
        handshake lookup walks every namespace), and then refers to it by that key from the
        other namespace: such a key is found in the namespace it names.
        """
        with self._consistent():
            row = self.conn.execute(_SELECT + "WHERE s.namespace = ? AND s.key = ?", (namespace, key)).fetchone()
            owner = backend_namespace(key)
            if row is None and owner is not None and owner != namespace:
                row = self.conn.execute(_SELECT + "WHERE s.namespace = ? AND s.key = ?", (owner, key)).fetchone()
            return self._with_labels([_row(row)])[0] if row else None

    def chain(self, snapshot_id: int) -> list[Snapshot]:
        """The snapshot and its ancestors, nearest first, with labels."""
        with self._consistent():
            return self._chain(snapshot_id)

    def _chain(self, snapshot_id: int) -> list[Snapshot]:
        rows = self.conn.execute(
            "WITH RECURSIVE chain(id, depth) AS ("
            " SELECT ?, 0 UNION ALL"
            " SELECT s.parent_id, c.depth + 1 FROM snapshots s JOIN chain c ON s.id = c.id WHERE s.parent_id IS NOT NULL)"
            + _SELECT.replace("FROM snapshots s", "FROM chain c JOIN snapshots s ON s.id = c.id")
            + "ORDER BY c.depth",
            (snapshot_id,),
        ).fetchall()
        return self._with_labels([_row(r) for r in rows])

    def list(self, namespace: str | None = None) -> list[Snapshot]:
        """Every snapshot (of one namespace, or of all when None), with labels, by id."""
        with self._consistent():
            return self._list(namespace)

    def _list(self, namespace: str | None) -> list[Snapshot]:
        if namespace is None:
            rows = self.conn.execute(_SELECT + "ORDER BY s.id").fetchall()
        else:
            rows = self.conn.execute(_SELECT + "WHERE s.namespace = ? ORDER BY s.id", (namespace,)).fetchall()
        snapshots = [_row(r) for r in rows]
        by_id = {s.id: s for s in snapshots}
        for sid, key, value in self.conn.execute("SELECT snapshot_id, key, value FROM labels"):
            if sid in by_id:
                by_id[sid].labels[key] = value
        return snapshots

    def has_children(self, snapshot_id: int) -> bool:
        """Whether any snapshot names this one as its parent."""
        return self.conn.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (snapshot_id,)).fetchone() is not None

    def ids(self) -> set[int]:
        """The ids of every snapshot (the directories that are owned)."""
        return {r[0] for r in self.conn.execute("SELECT id FROM snapshots")}

    def _with_labels(self, snapshots: list[Snapshot]) -> list[Snapshot]:
        if snapshots:
            by_id = {s.id: s for s in snapshots}
            marks = ",".join("?" * len(by_id))
            for sid, key, value in self.conn.execute(
                f"SELECT snapshot_id, key, value FROM labels WHERE snapshot_id IN ({marks})", tuple(by_id)
            ):
                by_id[sid].labels[key] = value
        return snapshots


class Transaction(_Reader):
    """The open write transaction: reads see its own changes."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def insert(
        self,
        namespace: str,
        key: str,
        kind: Kind,
        parent_id: int | None,
        labels: dict[str, str],
        size: int = 0,
        inodes: int = 0,
    ) -> int:
        """Add a snapshot; returns its id."""
        now = time.time_ns()
        cur = self.conn.execute(
            "INSERT INTO snapshots (namespace, key, kind, parent_id, created_ns, updated_ns, size, inodes)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (namespace, key, int(kind), parent_id, now, now, size, inodes),
        )
        sid = int(cur.lastrowid)
        self._put_labels(sid, labels)
        return sid

    def commit_active(self, snapshot_id: int, name: str, labels: dict[str, str], size: int, inodes: int) -> None:
        """Turn an active snapshot into a committed one named `name` (same id, labels replaced)."""
        now = time.time_ns()
        self.conn.execute(
            "UPDATE snapshots SET key = ?, kind = ?, created_ns = ?, updated_ns = ?, size = ?, inodes = ? WHERE id = ?",
            (name, int(Kind.COMMITTED), now, now, size, inodes, snapshot_id),
        )
        self.conn.execute("DELETE FROM labels WHERE snapshot_id = ?", (snapshot_id,))
        self._put_labels(snapshot_id, labels)

    def set_labels(self, snapshot_id: int, labels: dict[str, str]) -> None:
        """Replace a snapshot's labels and bump its updated time."""
        self.conn.execute("UPDATE snapshots SET updated_ns = ? WHERE id = ?", (time.time_ns(), snapshot_id))
        self.conn.execute("DELETE FROM labels WHERE snapshot_id = ?", (snapshot_id,))
        self._put_labels(snapshot_id, labels)

    def delete(self, snapshot_id: int) -> None:
        """Remove a snapshot (and its labels); the foreign key refuses if it has children."""
        self.conn.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))

    def _put_labels(self, snapshot_id: int, labels: dict[str, str]) -> None:
        self.conn.executemany(
            "INSERT INTO labels (snapshot_id, key, value) VALUES (?, ?, ?)",
            [(snapshot_id, k, v) for k, v in labels.items() if v != ""],
        )


class Metadata(_Reader):
    """The metadata database of one snapshotter root."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        try:
            self._writer = self._connect()
            version = self._writer.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise MetadataError(
                    f"{self.path} has schema version {version}; this liftoff understands up to {SCHEMA_VERSION}: upgrade liftoff"
                )
            self._writer.execute("PRAGMA journal_mode = WAL")
            self._writer.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        except sqlite3.DatabaseError as e:
            raise MetadataError(f"cannot open snapshot metadata {self.path}: {e}") from e

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA busy_timeout = 30000")
        with self._all_lock:
            self._all.append(conn)
        return conn

    @property
    def conn(self) -> sqlite3.Connection:  # type: ignore[override]
        """This thread's read connection."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    @contextmanager
    def write(self) -> Iterator[Transaction]:
        """The single write transaction: committed when the block ends, rolled back if it raises."""
        with self._lock:
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                yield Transaction(self._writer)
                self._writer.execute("COMMIT")
            except BaseException:
                if self._writer.in_transaction:
                    self._writer.execute("ROLLBACK")
                raise

    def check(self) -> list[str]:
        """Problems SQLite finds in the database (integrity and foreign keys); empty when sound."""
        problems = [r[0] for r in self.conn.execute("PRAGMA integrity_check") if r[0] != "ok"]
        problems += [f"dangling reference in {r[0]} row {r[1]}" for r in self.conn.execute("PRAGMA foreign_key_check")]
        return problems

    def close(self) -> None:
        """Close every connection."""
        with self._all_lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
