"""Authorization with an upstream registry: docker's token flow (anonymous or with credentials) and basic auth.

The proxy's own credentials come from a docker config file (layerstore.oci.auth.DockerCredentials).
A client's Authorization header is used instead only for upstreams configured with --pass-credentials;
tokens are cached per (identity, scope) so clients never share each other's tokens.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import re
import time

import aiohttp

from layerstore.oci.auth import DockerCredentials
from registry_proxy.config import Upstream
from registry_proxy.errors import ProxyError, bad_gateway, gateway_timeout

_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
PROXY_IDENTITY = "proxy"
TOKEN_MARGIN = 10.0  # seconds before expiry a token is renewed


def identity_of(client_auth: str | None) -> str:
    """Whose credentials a request uses: the proxy's, or a hash naming one client's header."""
    return "client:" + hashlib.sha256(client_auth.encode()).hexdigest()[:24] if client_auth else PROXY_IDENTITY


def basic_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def parse_basic(header: str) -> tuple[str, str] | None:
    """(user, password) of a `Basic ...` header, or None."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


class UpstreamAuth:
    """Authorization headers for one upstream, by identity and scope."""

    def __init__(
        self, upstream: Upstream, credentials: DockerCredentials, session: aiohttp.ClientSession, timeout: float
    ) -> None:
        self.upstream = upstream
        self.credentials = credentials
        self.session = session
        self.timeout = timeout
        self._headers: dict[tuple[str, str], tuple[str, float]] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def cached(self, identity: str, scope: str, client_auth: str | None) -> str | None:
        """The header to send first: a live cached one, else a client's own header passed through."""
        found = self._headers.get((identity, scope))
        if found and found[1] > time.monotonic():
            return found[0]
        return client_auth if client_auth and not client_auth.lower().startswith("basic ") else None

    async def authorize(
        self, challenge: str, scope: str, identity: str, client_auth: str | None, stale: str | None
    ) -> str | None:
        """A header answering `challenge`, or None when there is nothing to answer it with."""
        key = (identity, scope)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            found = self._headers.get(key)
            if found and found[1] > time.monotonic() and found[0] != stale:
                return found[0]  # another request renewed it meanwhile
            header, lifetime = await self._answer(challenge, scope, client_auth)
            if header is None:
                return None
            self._headers[key] = (header, time.monotonic() + max(1.0, lifetime - TOKEN_MARGIN))
            return header

    async def _credentials(self, client_auth: str | None) -> tuple[str, str] | None:
        if client_auth:
            return parse_basic(client_auth)
        found = await asyncio.to_thread(self.credentials.lookup, self.upstream.name)
        if found is None and self.upstream.host != self.upstream.name:
            found = await asyncio.to_thread(self.credentials.lookup, self.upstream.host)
        return found

    async def _answer(self, challenge: str, scope: str, client_auth: str | None) -> tuple[str | None, float]:
        scheme = challenge.split(" ", 1)[0].lower()
        if not scheme:  # a 401 without a challenge: nothing can answer it
            return None, 0.0
        creds = await self._credentials(client_auth)
        if scheme == "basic":
            return (basic_header(*creds) if creds else None), 300.0
        if scheme != "bearer":
            raise bad_gateway(f"upstream {self.upstream.name} sent an unsupported authentication challenge {challenge[:100]!r}")
        params = dict(_CHALLENGE_PARAM.findall(challenge))
        realm = params.get("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise bad_gateway(f"upstream {self.upstream.name} sent a bearer challenge without a usable realm ({realm[:100]!r})")
        query = {"scope": params.get("scope") or scope}
        if params.get("service"):
            query["service"] = params["service"]
        auth = aiohttp.BasicAuth(*creds) if creds else None
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with self.session.get(realm, params=query, auth=auth, timeout=timeout, allow_redirects=False) as response:
                if response.status in (401, 403):
                    who = (
                        "the client's credentials" if client_auth else "the proxy's credentials" if creds else "anonymous access"
                    )
                    raise ProxyError(
                        401 if client_auth else 403,
                        "UNAUTHORIZED" if client_auth else "DENIED",
                        f"the token service of upstream {self.upstream.name} refused {who} for {query['scope']}",
                    )
                if response.status != 200:
                    raise bad_gateway(f"the token service of upstream {self.upstream.name} answered {response.status}")
                body = await response.json(content_type=None)
        except TimeoutError:
            raise gateway_timeout(
                f"the token service of upstream {self.upstream.name} did not answer within {self.timeout:.0f} s"
            ) from None
        except (aiohttp.ClientError, ValueError) as e:
            raise bad_gateway(f"the token service of upstream {self.upstream.name} failed: {str(e)[:200]}") from None
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise bad_gateway(f"the token service of upstream {self.upstream.name} returned no token")
        lifetime = body.get("expires_in")
        return f"Bearer {token}", float(lifetime) if isinstance(lifetime, int | float) and lifetime > 0 else 60.0
