"""The proxy's SQLite state file (manifests, tags, repository links, the conversion queue).

One connection, used from the event loop's thread only: every statement is a small indexed read or
write, and WAL keeps commits cheap.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from layerstore.errors import LiftoffError


def open_db(path: Path) -> sqlite3.Connection:
    """Open (creating) the state database in WAL mode."""
    try:
        db = sqlite3.connect(path, isolation_level=None, timeout=10)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.Error as e:
        raise LiftoffError(f"cannot open the proxy's state database {path}: {e}; check --cache-dir") from None
    db.row_factory = sqlite3.Row
    return db
