"""Manifests: cached by digest forever (they are immutable), tags revalidated after a TTL.

A stale tag is revalidated with a HEAD (the digest header tells whether it moved); if the upstream is
down or failing (5xx, timeout, 429), the stale manifest is served and counted, so a regional outage
upstream does not stop pulls of images already seen. Concurrent requests for the same manifest share
one upstream request.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from layerstore.oci import mediatypes
from layerstore.oci.manifest import sniff_media_type
from registry_proxy.access import Access
from registry_proxy.auth import identity_of
from registry_proxy.errors import ProxyError, bad_gateway, gateway_timeout
from registry_proxy.metrics import ProxyMetrics
from registry_proxy.routes import DIGEST
from registry_proxy.upstream import UpstreamClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Manifest:
    digest: str
    media_type: str
    body: bytes
    source: str  # cache, upstream, stale


class ManifestCache:
    """Manifests by digest and tags (upstream, repository, tag) -> digest, in the state database."""

    def __init__(self, db: sqlite3.Connection, access: Access, metrics: ProxyMetrics, ttl: float, max_bytes: int) -> None:
        self.db = db
        self.access = access
        self.metrics = metrics
        self.ttl = ttl
        self.max_bytes = max_bytes
        self._flights: dict[tuple, asyncio.Future] = {}
        db.executescript(
            "CREATE TABLE IF NOT EXISTS manifests (digest TEXT PRIMARY KEY, media_type TEXT NOT NULL, body BLOB NOT NULL, "
            "  stored_at REAL NOT NULL);"
            "CREATE TABLE IF NOT EXISTS tags (upstream TEXT NOT NULL, repository TEXT NOT NULL, tag TEXT NOT NULL, "
            "  digest TEXT NOT NULL, checked_at REAL NOT NULL, PRIMARY KEY (upstream, repository, tag)) WITHOUT ROWID;"
        )

    def cached(self, digest: str) -> Manifest | None:
        row = self.db.execute("SELECT media_type, body FROM manifests WHERE digest = ?", (digest,)).fetchone()
        return Manifest(digest, row["media_type"], bytes(row["body"]), "cache") if row else None

    async def get(self, client: UpstreamClient, repository: str, reference: str, client_auth: str | None) -> Manifest:
        """The manifest `reference` (tag or digest) of `repository` on `client`'s upstream."""
        key = (client.name, repository, reference, identity_of(client_auth))
        if DIGEST.match(reference):
            found = self.cached(reference)
            if found is not None:
                await self.access.confirm(client, repository, reference, "manifest", client_auth)
                self.metrics.cache.labels("manifest", "hit").inc()
                return found
            self.metrics.cache.labels("manifest", "miss").inc()
            return await self._single(key, lambda: self._fetch(client, repository, reference, client_auth))
        row = self.db.execute(
            "SELECT digest, checked_at FROM tags WHERE upstream = ? AND repository = ? AND tag = ?",
            (client.name, repository, reference),
        ).fetchone()
        known = self.cached(row["digest"]) if row else None
        if known is not None and time.time() - row["checked_at"] < self.ttl:
            self.metrics.cache.labels("manifest", "hit").inc()
            return known
        self.metrics.cache.labels("manifest", "miss").inc()
        return await self._single(key, lambda: self._revalidate(client, repository, reference, client_auth, known))

    async def _single(self, key: tuple, start: Callable[[], Awaitable[Manifest]]) -> Manifest:
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(start())
            self._flights[key] = flight

            def done(future: asyncio.Future) -> None:
                self._flights.pop(key, None)
                if not future.cancelled():
                    future.exception()  # retrieved here: every waiter may have gone

            flight.add_done_callback(done)
        return await asyncio.shield(flight)

    async def _revalidate(
        self, client: UpstreamClient, repository: str, tag: str, client_auth: str | None, known: Manifest | None
    ) -> Manifest:
        try:
            if known is not None:
                response = await client.send(
                    "HEAD", f"/v2/{repository}/manifests/{tag}", repository, "manifest", f"manifest {repository}:{tag}",
                    client_auth=client_auth, headers={"Accept": mediatypes.ACCEPT},
                )  # fmt: skip
                digest = response.headers.get("Docker-Content-Digest", "")
                response.release()
                moved = self.cached(digest) if digest != known.digest and DIGEST.match(digest) else None
                if digest == known.digest or moved is not None:
                    self._tag(client.name, repository, tag, digest)
                    self.access.link(client.name, repository, digest)
                    return moved or known
            return await self._fetch(client, repository, tag, client_auth)
        except ProxyError as e:
            if known is not None and (e.status >= 500 or e.status == 429):
                self.metrics.stale.inc()
                log.warning(
                    "serving stale %s/%s:%s (%s): revalidation failed: %s", client.name, repository, tag, known.digest, e.message
                )
                return Manifest(known.digest, known.media_type, known.body, "stale")
            if e.status == 404:
                self.db.execute(
                    "DELETE FROM tags WHERE upstream = ? AND repository = ? AND tag = ?", (client.name, repository, tag)
                )
            raise

    async def _fetch(self, client: UpstreamClient, repository: str, reference: str, client_auth: str | None) -> Manifest:
        sep = "@" if DIGEST.match(reference) else ":"
        what = f"manifest {repository}{sep}{reference}"
        response = await client.send(
            "GET", f"/v2/{repository}/manifests/{reference}", repository, "manifest", what,
            client_auth=client_auth, headers={"Accept": mediatypes.ACCEPT},
        )  # fmt: skip
        try:
            declared = response.content_length
            if declared is not None and declared > self.max_bytes:
                raise self._oversized(client, what, declared)
            body = bytearray()
            while chunk := await response.content.read(1 << 16):
                body += chunk
                if len(body) > self.max_bytes:
                    raise self._oversized(client, what, None)
        except TimeoutError:
            raise gateway_timeout(f"upstream {client.name} stalled sending {what}") from None
        except aiohttp.ClientError as e:
            raise bad_gateway(f"upstream {client.name} broke off {what} ({type(e).__name__})") from None
        finally:
            response.release()
        if declared is not None and len(body) != declared:
            raise bad_gateway(f"upstream {client.name} sent {len(body)} of the {declared} bytes it announced for {what}")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        header = response.headers.get("Docker-Content-Digest", "")
        if (sep == "@" and digest != reference) or (header.startswith("sha256:") and header != digest):
            raise bad_gateway(
                f"upstream {client.name} sent {what} with the wrong content (it hashes to {digest}); nothing was cached",
                code="DIGEST_INVALID",
            )
        media_type = sniff_media_type(bytes(body), response.headers.get("Content-Type", ""))
        self.db.execute("INSERT OR IGNORE INTO manifests VALUES (?, ?, ?, ?)", (digest, media_type, bytes(body), time.time()))
        self.access.link(client.name, repository, digest)
        if sep == ":":
            self._tag(client.name, repository, reference, digest)
        return Manifest(digest, media_type, bytes(body), "upstream")

    def _tag(self, upstream: str, repository: str, tag: str, digest: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?, ?)", (upstream, repository, tag, digest, time.time()))

    def _oversized(self, client: UpstreamClient, what: str, size: int | None) -> ProxyError:
        told = f"{size} bytes" if size is not None else "larger"
        return bad_gateway(
            f"upstream {client.name} sent {what} of {told}, over the {self.max_bytes} byte limit for manifests "
            "(containerd's); not served",
            code="MANIFEST_INVALID",
        )
