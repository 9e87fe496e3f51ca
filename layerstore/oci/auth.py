"""Registry auth as docker does it: the pure parts both registry clients share.

The sync client (layerstore.oci.registry, requests) and the proxy's async client
(registry_proxy.auth, aiohttp) differ only in how they send HTTP. Everything else is here:
credentials from a docker config file (~/.docker/config.json) or a credential helper, the
WWW-Authenticate challenge (Bearer realm/service/scope, or Basic), the token request's query,
the token response, the retry policy of token requests (layerstore.retry), and the token cache
keyed by (identity, scope) so that two clients' credentials never share a token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerstore.errors import RegistryError
from layerstore.oci.reference import DOCKER_HUB, DOCKER_HUB_API
from layerstore.retry import Backoff

_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", DOCKER_HUB, DOCKER_HUB_API)


def default_config_path() -> Path:
    """$DOCKER_CONFIG/config.json, else ~/.docker/config.json."""
    base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return Path(base) / "config.json"


class DockerCredentials:
    """Look up (username, password) for a registry host in a docker config file."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path else default_config_path()
        self._config: dict = {}
        if self.path.exists():
            try:
                self._config = json.loads(self.path.read_text())
            except (OSError, ValueError) as e:
                raise RegistryError(f"cannot read docker config {self.path}: {e}") from None

    def lookup(self, registry: str, *aliases: str) -> tuple[str, str] | None:
        """Credentials for `registry` (host[:port]), else for the first alias that has some; None: anonymous."""
        for name in (registry, *aliases):
            found = self._lookup(name)
            if found is not None:
                return found
        return None

    def _lookup(self, registry: str) -> tuple[str, str] | None:
        keys = _HUB_KEYS if registry in _HUB_KEYS else (registry, f"https://{registry}", f"http://{registry}")
        helper = (self._config.get("credHelpers") or {}).get(registry) or self._config.get("credsStore")
        if helper:
            found = self._from_helper(helper, keys[0])
            if found:
                return found
        auths = self._config.get("auths") or {}
        for key in keys:
            entry = auths.get(key) or auths.get(key.rstrip("/"))
            if not entry:
                continue
            if entry.get("auth"):
                try:
                    user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
                except ValueError:
                    raise RegistryError(f"docker config {self.path}: 'auth' for {key} is not base64 user:password") from None
                return user, password
            if entry.get("username"):
                return entry["username"], entry.get("password", "")
        return None

    def _from_helper(self, helper: str, server: str) -> tuple[str, str] | None:
        try:
            done = subprocess.run([f"docker-credential-{helper}", "get"], input=server.encode(), capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if done.returncode != 0:
            return None
        try:
            found = json.loads(done.stdout)
            return found["Username"], found["Secret"]
        except (ValueError, KeyError):
            return None


# The token flow

TOKEN_ATTEMPTS = 4  # tries of one request (token or registry) that fails to connect or answers 408/429/5xx
TOKEN_BACKOFF = Backoff()
TOKEN_MARGIN = 10.0  # seconds before its expiry a cached token is renewed
DEFAULT_TOKEN_SECONDS = 60.0  # a token's lifetime when the response names none (the distribution spec's default)
BASIC_SECONDS = 300.0  # how long a Basic header is reused before the registry is asked again
CONFIGURED_IDENTITY = "configured"  # cache identity of the configured credentials (a docker config), not a client's

_PARAM = re.compile(r'([A-Za-z][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))')


def pull_scope(repository: str) -> str:
    """The token scope to read `repository`."""
    return f"repository:{repository}:pull"


@dataclass(frozen=True)
class Challenge:
    """A WWW-Authenticate challenge: its scheme (lowercase) and parameters."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")

    def token_query(self, scope: str) -> dict[str, str]:
        """The token request's query: the challenge's scope (else `scope`) and its service."""
        query = {"scope": self.params.get("scope") or scope}
        if self.params.get("service"):
            query["service"] = self.params["service"]
        return query


def parse_challenge(header: str) -> Challenge | None:
    """The first challenge of a WWW-Authenticate header (`Bearer realm="...",service="...",scope="..."`,
    `Basic realm="..."`); None for an empty header."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params = {m.group(1).lower(): re.sub(r"\\(.)", r"\1", m.group(2)) if m.group(2) is not None else m.group(3)
              for m in _PARAM.finditer(rest)}  # fmt: skip
    return Challenge(scheme.lower(), params)


def token_from_response(body: Any) -> tuple[str, float] | None:
    """(Authorization header, lifetime in seconds) from a token service's JSON body; None without a token."""
    if not isinstance(body, dict):
        return None
    token = body.get("token") or body.get("access_token")
    if not isinstance(token, str) or not token:
        return None
    lifetime = body.get("expires_in")
    ok = isinstance(lifetime, int | float) and not isinstance(lifetime, bool) and lifetime > 0
    return f"Bearer {token}", float(lifetime) if ok else DEFAULT_TOKEN_SECONDS


def basic_header(user: str, password: str) -> str:
    """The Authorization header of Basic credentials."""
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


def identity_of(client_auth: str | None) -> str:
    """Whose credentials a request uses: the configured ones, or a hash naming one client's header."""
    return "client:" + hashlib.sha256(client_auth.encode()).hexdigest()[:24] if client_auth else CONFIGURED_IDENTITY


class TokenCache:
    """Authorization headers by (identity, scope), each until TOKEN_MARGIN before it expires; thread-safe."""

    def __init__(self) -> None:
        self._headers: dict[tuple[str, str], tuple[str, float]] = {}
        self._lock = threading.Lock()

    def get(self, identity: str, scope: str) -> str | None:
        """A live header, or None."""
        with self._lock:
            found = self._headers.get((identity, scope))
        return found[0] if found and found[1] > time.monotonic() else None

    def put(self, identity: str, scope: str, header: str, lifetime: float) -> None:
        """Keep `header` for `lifetime` seconds less the margin (at least one second)."""
        with self._lock:
            self._headers[(identity, scope)] = (header, time.monotonic() + max(1.0, lifetime - TOKEN_MARGIN))
