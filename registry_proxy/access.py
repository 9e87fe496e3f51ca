"""Who may read what: blobs and manifests are cached once by digest, but served for a repository only
after its upstream showed it has them (a GET we made, or a HEAD to confirm), and, for upstreams with
--pass-credentials, only to clients whose own credentials the upstream accepts for that repository."""

from __future__ import annotations

import sqlite3
import time

from registry_proxy.auth import identity_of
from registry_proxy.errors import ProxyError
from registry_proxy.upstream import UpstreamClient

CLIENT_CHECK_TTL = 60.0


class Access:
    """Links (upstream, repository, digest) in the state database, and the pass-through credential gate."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        db.execute(
            "CREATE TABLE IF NOT EXISTS links (upstream TEXT NOT NULL, repository TEXT NOT NULL, digest TEXT NOT NULL, "
            "PRIMARY KEY (upstream, repository, digest)) WITHOUT ROWID"
        )
        self._clients: dict[tuple[str, str, str], float] = {}  # (identity, upstream, repository) -> checked at

    def linked(self, upstream: str, repository: str, digest: str) -> bool:
        row = self.db.execute(
            "SELECT 1 FROM links WHERE upstream = ? AND repository = ? AND digest = ?", (upstream, repository, digest)
        ).fetchone()
        return row is not None

    def link(self, upstream: str, repository: str, digest: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO links VALUES (?, ?, ?)", (upstream, repository, digest))

    async def confirm(self, client: UpstreamClient, repository: str, digest: str, kind: str, client_auth: str | None) -> None:
        """Make sure the upstream has `digest` in `repository` (HEAD, once); raises ProxyError (404) if not."""
        if self.linked(client.name, repository, digest):
            return
        path = f"/v2/{repository}/{'manifests' if kind == 'manifest' else 'blobs'}/{digest}"
        response = await client.send("HEAD", path, repository, kind, f"{kind} {digest} of {repository}", client_auth=client_auth)
        response.release()
        self.link(client.name, repository, digest)

    async def check_client(self, client: UpstreamClient, repository: str, client_auth: str | None) -> None:
        """For a --pass-credentials upstream: the client's credentials must let it pull `repository` upstream
        (checked with a tags/list request, remembered for a minute). A no-op for other upstreams."""
        if not client.upstream.pass_credentials:
            return
        if not client_auth:
            raise ProxyError(
                401,
                "UNAUTHORIZED",
                f"upstream {client.name} is proxied with the client's own credentials: log in to this proxy",
                headers={"WWW-Authenticate": f'Basic realm="liftoff proxy for {client.name}"'},
            )
        key = (identity_of(client_auth), client.name, repository)
        checked = self._clients.get(key)
        if checked is not None and time.monotonic() - checked < CLIENT_CHECK_TTL:
            return
        response = await client.send(
            "GET",
            f"/v2/{repository}/tags/list",
            repository,
            "tags",
            f"repository {repository}",
            client_auth=client_auth,
            query={"n": "1"},
        )
        response.release()
        self._clients[key] = time.monotonic()
