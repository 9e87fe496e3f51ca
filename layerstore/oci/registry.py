"""A client for the OCI distribution API: manifests and blobs, with docker's auth flows."""

from __future__ import annotations

import base64
import hashlib
import re
import threading
from typing import BinaryIO

import requests

from layerstore.digests import check_digest
from layerstore.errors import ImageError, RegistryError
from layerstore.oci import mediatypes
from layerstore.oci.auth import DockerCredentials
from layerstore.oci.reference import Reference

_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


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
    ) -> None:
        self.registry = registry
        host = endpoint or registry
        self.base = f"{'http' if plain_http else 'https'}://{host}"
        self.plain_http = plain_http
        self.credentials = credentials if credentials is not None else DockerCredentials()
        self.timeout = timeout
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._auth: dict[str, str] = {}  # scope -> Authorization header value

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

    def _request(self, method: str, path: str, repository: str, headers: dict[str, str], stream: bool) -> requests.Response:
        scope = f"repository:{repository}:pull"
        url = self.base + path
        for attempt in range(2):
            sent = dict(headers)
            if scope in self._auth:
                sent["Authorization"] = self._auth[scope]
            try:
                response = self.session.request(method, url, headers=sent, stream=stream, timeout=self.timeout)
            except requests.exceptions.SSLError as e:
                reason = re.search(r"SSLError\(\d+, '([^']+)'", str(e))
                detail = reason.group(1) if reason else "handshake failed"
                raise RegistryError(
                    f"TLS failed talking to {self.registry} ({detail}); for a plain-HTTP registry pass --plain-http"
                ) from None
            except requests.exceptions.RequestException as e:
                hint = "" if self.plain_http else " (for a plain-HTTP registry pass --plain-http)"
                raise RegistryError(f"registry {self.registry} is unreachable: {_short(e)}{hint}") from None
            if response.status_code != 401 or attempt == 1:
                return response
            challenge = response.headers.get("WWW-Authenticate", "")
            response.close()
            self._auth[scope] = self._authorize(challenge, scope)
        raise AssertionError("unreachable")

    def _authorize(self, challenge: str, scope: str) -> str:
        scheme = challenge.split(" ", 1)[0].lower()
        creds = self.credentials.lookup(self.registry)
        if scheme == "basic":
            if not creds:
                raise RegistryError(
                    f"401 Unauthorized from {self.registry}: it needs credentials; "
                    f"run docker login {self.registry} or add them to {self.credentials.path}"
                )
            return _basic(*creds)
        if scheme != "bearer":
            raise RegistryError(f"401 Unauthorized from {self.registry} with an unsupported challenge {challenge!r}")
        params = dict(_CHALLENGE_PARAM.findall(challenge))
        realm = params.get("realm")
        if not realm:
            raise RegistryError(f"401 from {self.registry}: bearer challenge without a realm")
        query = {"scope": params.get("scope", scope)}
        if "service" in params:
            query["service"] = params["service"]
        try:
            response = self.session.get(realm, params=query, auth=creds, timeout=self.timeout)
        except requests.exceptions.RequestException as e:
            raise RegistryError(f"token service {realm} for {self.registry} is unreachable: {_short(e)}") from None
        if response.status_code != 200:
            raise RegistryError(
                f"token service {realm} refused access to {scope} ({response.status_code}); check credentials for {self.registry}"
            )
        try:
            body = response.json()
            token = body.get("token") or body["access_token"]
        except (ValueError, KeyError):
            raise RegistryError(f"token service {realm} returned no token") from None
        return f"Bearer {token}"

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
            "GET", f"/v2/{reference.repository}/manifests/{ref}", reference.repository, {"Accept": mediatypes.ACCEPT}, stream=True
        )
        with response:
            if response.status_code != 200:
                raise self._error(response, what)
            body = _read_limited(response, mediatypes.MAX_MANIFEST_BYTES, f"{reference}: {what}")
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
        response = self._request("GET", f"/v2/{reference.repository}/blobs/{digest}", reference.repository, {}, stream=True)
        if response.status_code != 200:
            error = self._error(response, f"blob {digest} of {reference.repository}")
            response.close()
            raise error
        response.raw.decode_content = False
        return response.raw


def _read_limited(response: requests.Response, limit: int, what: str) -> bytes:
    declared = int(response.headers.get("Content-Length") or 0)
    if declared > limit:
        raise ImageError(f"{what}: {declared} bytes is over the {limit} byte limit")
    body = response.raw.read(limit + 1, decode_content=True)
    if len(body) > limit:
        raise ImageError(f"{what}: over the {limit} byte limit")
    return body


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _short(error: Exception) -> str:
    text = str(error)
    match = re.search(r"\[Errno -?\d+\] [^'\")\]]+|Connection refused|timed out|Name or service not known", text)
    return match.group(0) if match else text[:200]
