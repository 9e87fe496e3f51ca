"""A client for the OCI distribution API: manifests and blobs, with docker's auth flows.

Redirects (registries send blob downloads to a CDN or an object store) are followed here, not by
requests, so that a failure names the host that failed and the registry that sent us there; the
Authorization header is not sent to another host, and https is never followed down to http.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable
from typing import BinaryIO
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from layerstore.digests import check_digest
from layerstore.errors import ImageError, RegistryError
from layerstore.jsondoc import load_json
from layerstore.oci import mediatypes
from layerstore.oci.auth import (
    BASIC_SECONDS,
    CONFIGURED_IDENTITY,
    TOKEN_ATTEMPTS,
    TOKEN_BACKOFF,
    DockerCredentials,
    TokenCache,
    basic_header,
    parse_challenge,
    pull_scope,
    token_from_response,
)
from layerstore.oci.bounded import BoundedReader, fetch_deadline
from layerstore.oci.reference import Reference
from layerstore.retry import Backoff, retryable_status

MAX_REDIRECTS = 5


class RegistryClient:
    """Talks to one registry host; handles anonymous bearer tokens and basic credentials."""

    def __init__(
        self,
        registry: str,
        *,
        endpoint: str | None = None,
        plain_http: bool = False,
        credentials: DockerCredentials | None = None,
        timeout: float = 60.0,
        fetch_timeout: float | None = None,
        backoff: Backoff = TOKEN_BACKOFF,
    ) -> None:
        """`timeout`: seconds without a byte before a request fails; `fetch_timeout`: the whole-fetch deadline
        for manifests (default: scaled from the size, layerstore.oci.bounded)."""
        self.registry = registry
        host = endpoint or registry
        self.base = f"{'http' if plain_http else 'https'}://{host}"
        self.plain_http = plain_http
        self.credentials = credentials if credentials is not None else DockerCredentials()
        self.timeout = timeout
        self.fetch_timeout = fetch_timeout
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self.backoff = backoff
        self._tokens = TokenCache()

    @property
    def session(self) -> requests.Session:
        """A session per thread (layers are fetched concurrently)."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            self._sessions.append(session)
        return session

    def close(self) -> None:
        """Close pooled connections."""
        for session in self._sessions:
            session.close()

    def _request(
        self, method: str, path: str, repository: str, headers: dict[str, str], stream: bool, what: str
    ) -> requests.Response:
        """A response to METHOD PATH, answering one 401 challenge; transient failures are retried (_retrying)."""
        scope = pull_scope(repository)
        url = self.base + path
        for attempt in range(2):
            sent = dict(headers)
            header = self._tokens.get(CONFIGURED_IDENTITY, scope)
            if header:
                sent["Authorization"] = header
            response = self._retrying(lambda sent=sent: self._send(method, url, sent, stream, what))
            if response.status_code != 401 or attempt == 1:
                return response
            challenge = response.headers.get("WWW-Authenticate", "")
            response.close()
            self._tokens.put(CONFIGURED_IDENTITY, scope, *self._authorize(challenge, scope))
        raise AssertionError("unreachable")

    def _retrying(self, send: Callable[[], requests.Response]) -> requests.Response:
        """send(), again after a backoff pause while it cannot connect or answers 408/429/5xx (TOKEN_ATTEMPTS in all)."""
        pauses = self.backoff.pauses(TOKEN_ATTEMPTS)
        while True:
            try:
                response = send()
            except _Transient:
                if next(pauses, None) is None:
                    raise
                continue
            if not retryable_status(response.status_code) or next(pauses, None) is None:
                return response
            response.close()

    def _send(self, method: str, url: str, headers: dict[str, str], stream: bool, what: str) -> requests.Response:
        """One request, following redirects itself: an error names the host that failed."""
        origin = urlsplit(url).netloc
        for _ in range(MAX_REDIRECTS + 1):
            host = urlsplit(url).netloc
            via = "" if host == origin else f" (registry {self.registry} redirected {what} there)"
            try:
                response = self.session.request(
                    method, url, headers=headers, stream=stream, timeout=self.timeout, allow_redirects=False
                )
            except requests.exceptions.SSLError as e:
                reason = re.search(r"SSLError\(\d+, '([^']+)'", str(e))
                detail = reason.group(1) if reason else "handshake failed"
                if via:
                    raise RegistryError(f"TLS failed talking to {host} ({detail}){via}") from None
                raise RegistryError(
                    f"TLS failed talking to {self.registry} ({detail}); for a plain-HTTP registry pass --plain-http"
                ) from None
            except requests.exceptions.RequestException as e:
                if via:
                    raise _Transient(f"{host} is unreachable: {_short(e)}{via}") from None
                hint = "" if self.plain_http else " (for a plain-HTTP registry pass --plain-http)"
                raise _Transient(f"registry {self.registry} is unreachable: {_short(e)}{hint}") from None
            if not response.is_redirect:
                return response
            target = urljoin(url, response.headers["Location"])
            response.close()
            scheme = urlsplit(target).scheme
            if scheme not in ("http", "https") or (url.startswith("https:") and scheme == "http"):
                raise RegistryError(f"{host} redirected {what} to {target[:200]!r}, which is not followed (not https)")
            if urlsplit(target).netloc != host:
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}  # a CDN gets a signed URL
            url = target
        raise RegistryError(f"registry {self.registry} redirected {what} more than {MAX_REDIRECTS} times")

    def _authorize(self, header: str, scope: str) -> tuple[str, float]:
        """(Authorization header, lifetime) answering a 401's challenge: Basic credentials, or a bearer token."""
        challenge = parse_challenge(header)
        creds = self.credentials.lookup(self.registry)
        if challenge is not None and challenge.scheme == "basic":
            if not creds:
                raise RegistryError(
                    f"401 Unauthorized from {self.registry}: it needs credentials; "
                    f"run docker login {self.registry} or add them to {self.credentials.path}"
                )
            return basic_header(*creds), BASIC_SECONDS
        if challenge is None or challenge.scheme != "bearer":
            raise RegistryError(f"401 Unauthorized from {self.registry} with an unsupported challenge {header[:100]!r}")
        realm = challenge.realm
        if not realm.startswith(("https://", "http://")):
            raise RegistryError(f"401 from {self.registry}: bearer challenge without a usable realm ({realm[:100]!r})")

        def get() -> requests.Response:
            query = challenge.token_query(scope)
            try:
                return self.session.get(realm, params=query, auth=creds, timeout=self.timeout)
            except requests.exceptions.RequestException as e:
                raise _Transient(f"token service {realm} for {self.registry} is unreachable: {_short(e)}") from None

        with self._retrying(get) as response:
            if response.status_code != 200:
                raise RegistryError(
                    f"token service {realm} refused access to {scope} ({response.status_code}); "
                    f"check credentials for {self.registry}"
                )
            try:
                found = token_from_response(load_json(response.content, f"token service {realm}", RegistryError))
            except requests.exceptions.RequestException as e:
                raise RegistryError(f"token service {realm} for {self.registry} broke off: {_short(e)}") from None
        if found is None:
            raise RegistryError(f"token service {realm} returned no token")
        return found

    def _error(self, response: requests.Response, what: str) -> RegistryError:
        detail = ""
        try:
            errors = response.json().get("errors") or []
            if errors:
                detail = f": {errors[0].get('code', '')} {errors[0].get('message', '')}".rstrip()
        except ValueError:
            pass
        status = response.status_code
        if status == 401:
            return RegistryError(
                f"401 Unauthorized for {what} on {self.registry}{detail}; check credentials ({self.credentials.path})"
            )
        if status == 404:
            return RegistryError(f"{what} not found on {self.registry} (404){detail}")
        return RegistryError(f"{self.registry} answered {status} for {what}{detail}")

    def get_manifest(self, reference: Reference, ref: str | None = None) -> tuple[str, bytes, str]:
        """Fetch a manifest or index: (media type, exact bytes, digest), digest-verified."""
        ref = ref or reference.ref
        what = (
            f"manifest {reference.repository}:{ref}"
            if not ref.startswith("sha256:")
            else f"manifest {reference.repository}@{ref}"
        )
        response = self._request(
            "GET",
            f"/v2/{reference.repository}/manifests/{ref}",
            reference.repository,
            {"Accept": mediatypes.ACCEPT},
            stream=True,
            what=what,
        )
        with response:
            if response.status_code != 200:
                raise self._error(response, what)
            body = self._read_limited(response, mediatypes.MAX_MANIFEST_BYTES, f"{reference}: {what}")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if ref.startswith("sha256:") and digest != ref:
            raise ImageError(f"{reference}: {what} has digest {digest}, not the requested one")
        header = response.headers.get("Docker-Content-Digest")
        if header and header.startswith("sha256:") and header != digest:
            raise ImageError(f"{reference}: {what}: registry says digest {header} but the body hashes to {digest}")
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        return media_type, body, digest

    def open_blob(self, reference: Reference, digest: str) -> BinaryIO:
        """A stream of a blob's bytes (the caller verifies the digest while reading)."""
        check_digest(digest)
        what = f"blob {digest} of {reference.repository}"
        response = self._request("GET", f"/v2/{reference.repository}/blobs/{digest}", reference.repository, {}, True, what)
        if response.status_code != 200:
            error = self._error(response, f"blob {digest} of {reference.repository}")
            response.close()
            raise error
        response.raw.decode_content = False
        return response.raw

    def _read_limited(self, response: requests.Response, limit: int, what: str) -> bytes:
        """A small body (a manifest), at most `limit` bytes, within the fetch deadline."""
        length = response.headers.get("Content-Length", "")
        declared = int(length) if length.isdigit() else None
        if declared is not None and declared > limit:
            raise ImageError(f"{what}: {declared} bytes is over the {limit} byte limit")
        response.raw.decode_content = True
        reader = BoundedReader(
            response.raw,  # type: ignore[arg-type]
            limit=limit,
            seconds=fetch_deadline(limit, self.fetch_timeout),
            what=what,
            declared="allowed",
            expected=declared,
        )
        try:
            return reader.read_all()
        except ImageError:
            raise ImageError(f"{what}: over the {limit} byte limit") from None
        except urllib3.exceptions.HTTPError as e:
            raise RegistryError(f"{what}: reading it from {self.registry} failed: {_short(e)}") from None


class _Transient(RegistryError):
    """A request that got no answer (refused, reset, timed out): worth another try."""


def _short(error: Exception) -> str:
    text = str(error)
    match = re.search(r"\[Errno -?\d+\] [^'\")\]]+|Connection refused|timed out|Name or service not known", text)
    return match.group(0) if match else text[:200]
