"""Authorization with an upstream registry: docker's token flow (anonymous or with credentials) and basic auth.

The rules (challenge parsing, the token query, the token response, the token cache and the retry policy
of token requests) are layerstore.oci.auth's, shared with `liftoff convert`'s client; only the HTTP call
(aiohttp) is here. The proxy's own credentials come from a docker config file; a client's Authorization
header is used instead only for upstreams configured with --pass-credentials; tokens are cached per
(identity, scope) so clients never share each other's tokens.
"""

from __future__ import annotations

import asyncio

import aiohttp

from layerstore.errors import FormatError
from layerstore.jsondoc import load_json
from layerstore.oci.auth import (
    BASIC_SECONDS,
    TOKEN_ATTEMPTS,
    TOKEN_BACKOFF,
    DockerCredentials,
    TokenCache,
    basic_header,
    identity_of,
    parse_basic,
    parse_challenge,
    token_from_response,
)
from layerstore.retry import Backoff, retryable_status
from registry_proxy.config import Upstream
from registry_proxy.errors import ProxyError, bad_gateway, gateway_timeout

__all__ = ["UpstreamAuth", "identity_of"]


class UpstreamAuth:
    """Authorization headers for one upstream, by identity and scope."""

    def __init__(
        self,
        upstream: Upstream,
        credentials: DockerCredentials,
        session: aiohttp.ClientSession,
        timeout: float,
        backoff: Backoff = TOKEN_BACKOFF,
    ) -> None:
        self.upstream = upstream
        self.credentials = credentials
        self.session = session
        self.timeout = timeout
        self.backoff = backoff
        self._tokens = TokenCache()
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def cached(self, identity: str, scope: str, client_auth: str | None) -> str | None:
        """The header to send first: a live cached one, else a client's own header passed through."""
        found = self._tokens.get(identity, scope)
        if found:
            return found
        return client_auth if client_auth and not client_auth.lower().startswith("basic ") else None

    async def authorize(
        self, challenge: str, scope: str, identity: str, client_auth: str | None, stale: str | None
    ) -> str | None:
        """A header answering `challenge`, or None when there is nothing to answer it with."""
        lock = self._locks.setdefault((identity, scope), asyncio.Lock())
        async with lock:
            found = self._tokens.get(identity, scope)
            if found and found != stale:
                return found  # another request renewed it meanwhile
            header, lifetime = await self._answer(challenge, scope, client_auth)
            if header is None:
                return None
            self._tokens.put(identity, scope, header, lifetime)
            return header

    async def _credentials(self, client_auth: str | None) -> tuple[str, str] | None:
        if client_auth:
            return parse_basic(client_auth)
        return await asyncio.to_thread(self.credentials.lookup, self.upstream.name, self.upstream.host)

    async def _answer(self, header: str, scope: str, client_auth: str | None) -> tuple[str | None, float]:
        challenge = parse_challenge(header)
        if challenge is None:  # a 401 without a challenge: nothing can answer it
            return None, 0.0
        creds = await self._credentials(client_auth)
        if challenge.scheme == "basic":
            return (basic_header(*creds) if creds else None), BASIC_SECONDS
        if challenge.scheme != "bearer":
            raise bad_gateway(f"upstream {self.upstream.name} sent an unsupported authentication challenge {header[:100]!r}")
        realm = challenge.realm
        if not realm.startswith(("https://", "http://")):
            raise bad_gateway(f"upstream {self.upstream.name} sent a bearer challenge without a usable realm ({realm[:100]!r})")
        query = challenge.token_query(scope)
        auth = aiohttp.BasicAuth(*creds) if creds else None
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        service = f"the token service of upstream {self.upstream.name}"
        for attempt in range(1, TOKEN_ATTEMPTS + 1):
            try:
                async with self.session.get(realm, params=query, auth=auth, timeout=timeout, allow_redirects=False) as response:
                    status = response.status
                    body = await response.read() if status == 200 else b""
            except (TimeoutError, aiohttp.ClientError) as e:
                if attempt < TOKEN_ATTEMPTS:
                    await asyncio.sleep(self.backoff.delay(attempt))
                    continue
                if isinstance(e, TimeoutError):
                    raise gateway_timeout(f"{service} did not answer within {self.timeout:.0f} s") from None
                raise bad_gateway(f"{service} failed: {str(e)[:200] or type(e).__name__}") from None
            if retryable_status(status) and attempt < TOKEN_ATTEMPTS:
                await asyncio.sleep(self.backoff.delay(attempt))
                continue
            break
        if status in (401, 403):
            who = "the client's credentials" if client_auth else "the proxy's credentials" if creds else "anonymous access"
            raise ProxyError(
                401 if client_auth else 403,
                "UNAUTHORIZED" if client_auth else "DENIED",
                f"{service} refused {who} for {query['scope']}",
            )
        if status != 200:
            raise bad_gateway(f"{service} answered {status}")
        try:
            found = token_from_response(load_json(body, service))
        except FormatError as e:
            raise bad_gateway(str(e)) from None
        if found is None:
            raise bad_gateway(f"{service} returned no token")
        return found
