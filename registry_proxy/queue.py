"""The persistent conversion queue (SQLite): one job per manifest digest, retried with backoff, failures kept.

States: queued -> running -> done | queued (retry at next_at) | failed. A job left `running` by a proxy
that died is queued again at start. Child manifests of a queued index are `covered` by its job, so
pulling them does not queue them twice.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass

STATES = ("queued", "running", "done", "failed")


@dataclass(frozen=True)
class Job:
    digest: str
    upstream: str
    repository: str
    tag: str | None
    media_type: str
    state: str
    attempts: int

    @property
    def name(self) -> str:
        return f"{self.upstream}/{self.repository}" + (f":{self.tag}" if self.tag else "") + f"@{self.digest}"


class ConversionQueue:
    """Jobs in the state database; every method is a short statement on the event loop's thread."""

    def __init__(self, db: sqlite3.Connection, retries: int, backoff: float, retry_failed_after: float = 3600.0) -> None:
        self.db = db
        self.retries = retries
        self.backoff = backoff
        self.retry_failed_after = retry_failed_after
        db.executescript(
            "CREATE TABLE IF NOT EXISTS conversions (digest TEXT PRIMARY KEY, upstream TEXT NOT NULL, repository TEXT NOT NULL, "
            "  tag TEXT, media_type TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, "
            "  next_at REAL NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL, started_at REAL, finished_at REAL, "
            "  error TEXT, result TEXT);"
            "CREATE INDEX IF NOT EXISTS conversions_due ON conversions (state, next_at);"
            "CREATE TABLE IF NOT EXISTS covered (child TEXT PRIMARY KEY, parent TEXT NOT NULL) WITHOUT ROWID;"
        )
        db.execute("UPDATE conversions SET state = 'queued', next_at = ? WHERE state = 'running'", (time.time(),))

    def enqueue(
        self, upstream: str, repository: str, tag: str | None, digest: str, media_type: str, children: Sequence[str] = ()
    ) -> bool:
        """Queue a conversion unless one exists (a failed one is queued again after retry_failed_after); True if queued now."""
        now = time.time()
        if self.db.execute("SELECT 1 FROM covered WHERE child = ?", (digest,)).fetchone():
            return False
        inserted = self.db.execute(
            "INSERT OR IGNORE INTO conversions "
            "(digest, upstream, repository, tag, media_type, state, next_at, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?)",
            (digest, upstream, repository, tag, media_type, now, now, now),
        ).rowcount
        if not inserted:
            if tag:  # remember a tag for the image record's references
                self.db.execute("UPDATE conversions SET tag = ? WHERE digest = ? AND tag IS NULL", (tag, digest))
            inserted = self.db.execute(
                "UPDATE conversions SET state = 'queued', attempts = 0, next_at = ?, updated_at = ?, error = NULL "
                "WHERE digest = ? AND state = 'failed' AND finished_at < ?",
                (now, now, digest, now - self.retry_failed_after),
            ).rowcount
        self.db.executemany("INSERT OR IGNORE INTO covered VALUES (?, ?)", [(child, digest) for child in children])
        return bool(inserted)

    def claim(self) -> Job | None:
        """The oldest due job, now running."""
        now = time.time()
        row = self.db.execute(
            "UPDATE conversions SET state = 'running', attempts = attempts + 1, started_at = ?, updated_at = ? "
            "WHERE digest = (SELECT digest FROM conversions WHERE state = 'queued' AND next_at <= ? ORDER BY created_at LIMIT 1) "
            "RETURNING digest, upstream, repository, tag, media_type, state, attempts",
            (now, now, now),
        ).fetchone()
        return Job(**dict(row)) if row else None

    def next_due(self) -> float | None:
        """When the next queued job becomes due (epoch seconds), or None."""
        row = self.db.execute("SELECT min(next_at) FROM conversions WHERE state = 'queued'").fetchone()
        return row[0] if row and row[0] is not None else None

    def done(self, job: Job, result: dict) -> None:
        now = time.time()
        self.db.execute(
            "UPDATE conversions SET state = 'done', finished_at = ?, updated_at = ?, error = NULL, result = ? WHERE digest = ?",
            (now, now, json.dumps(result), job.digest),
        )

    def failed(self, job: Job, error: str, permanent: bool) -> bool:
        """Record a failed attempt; retried after backoff unless permanent or out of retries. True if it will be retried."""
        now = time.time()
        retry = not permanent and job.attempts < self.retries
        if retry:
            delay = min(self.backoff * 2 ** (job.attempts - 1), 3600.0)
            self.db.execute(
                "UPDATE conversions SET state = 'queued', next_at = ?, updated_at = ?, error = ? WHERE digest = ?",
                (now + delay, now, error, job.digest),
            )
        else:
            self.db.execute(
                "UPDATE conversions SET state = 'failed', finished_at = ?, updated_at = ?, error = ? WHERE digest = ?",
                (now, now, error, job.digest),
            )
        return retry

    def requeue(self, job: Job) -> None:
        """Put back a job interrupted by shutdown, without counting the attempt."""
        self.db.execute(
            "UPDATE conversions SET state = 'queued', attempts = attempts - 1, next_at = ? "
            "WHERE digest = ? AND state = 'running'",
            (time.time(), job.digest),
        )

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for state, n in self.db.execute("SELECT state, count(*) FROM conversions GROUP BY state"):
            counts[state] = n
        return counts

    def jobs(self, state: str | None = None, limit: int = 100) -> list[dict]:
        """Jobs, newest first, as the conversions endpoint shows them."""
        query = "SELECT * FROM conversions" + (" WHERE state = ?" if state else "") + " ORDER BY created_at DESC LIMIT ?"
        rows = self.db.execute(query, (state, limit) if state else (limit,)).fetchall()
        out = []
        for row in rows:
            job = dict(row)
            job["result"] = json.loads(job["result"]) if job["result"] else None
            out.append(job)
        return out
