"""Requests to one configured upstream registry (aiohttp, streaming), with auth, redirects and error mapping.

Request paths are built only from validated repository names and references; the host is always the
configured upstream's. A redirect the upstream itself issues (registries send blob downloads to their
CDN or object store) is followed, without our Authorization header when it leaves the upstream's host,
and never from https down to http.
"""

from __future__ import annotations

import logging
import time
from urllib.parse import urljoin, urlsplit

import aiohttp

from layerstore.errors import FormatError
from layerstore.jsondoc import load_json
from registry_proxy.auth import UpstreamAuth, identity_of
from registry_proxy.config import Upstream
from registry_proxy.errors import ProxyError, bad_gateway, denied, gateway_timeout, unknown
from registry_proxy.metrics import ProxyMetrics

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
MAX_ERROR_BODY = 64 << 10


class UpstreamClient:
    """One upstream registry."""

    def __init__(
        self, upstream: Upstream, session: aiohttp.ClientSession, auth: UpstreamAuth, timeout: float, metrics: ProxyMetrics
    ) -> None:
        self.upstream = upstream
        self.session = session
        self.auth = auth
        self.timeout = timeout
        self.metrics = metrics

    @property
    def name(self) -> str:
        return self.upstream.name

    async def send(
        self,
        method: str,
        path: str,
        repository: str,
        kind: str,
        what: str,
        *,
        client_auth: str | None = None,
        headers: dict[str, str] | None = None,
        query: dict[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """A 2xx response (the caller releases it) to METHOD upstream/PATH; ProxyError otherwise."""
        scope = f"repository:{repository}:pull"
        identity = identity_of(client_auth)
        sent = self.auth.cached(identity, scope, client_auth)
        for attempt in range(2):
            response = await self._send(method, path, kind, what, headers, query, sent)
            if response.status != 401 or attempt == 1:
                break
            challenge = response.headers.get("WWW-Authenticate", "")
            response.close()  # not reused: a body sent with a HEAD answer would poison the connection
            sent = await self.auth.authorize(challenge, scope, identity, client_auth, sent)
            if sent is None:
                break
        if 200 <= response.status < 300:
            return response
        try:
            raise await self._error(response, kind, what, client_auth)
        finally:
            response.close()

    async def _send(
        self,
        method: str,
        path: str,
        kind: str,
        what: str,
        headers: dict[str, str] | None,
        query: dict[str, str] | None,
        authorization: str | None,
    ) -> aiohttp.ClientResponse:
        url = self.upstream.url + path
        sent = dict(headers or {})
        if authorization:
            sent["Authorization"] = authorization
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=self.timeout)
        started = time.monotonic()
        try:
            for _ in range(MAX_REDIRECTS + 1):
                response = await self.session.request(
                    method, url, headers=sent, params=query, timeout=timeout, allow_redirects=False
                )
                query = None  # a redirect's Location carries its own query
                if response.status not in (301, 302, 303, 307, 308) or "Location" not in response.headers:
                    self.metrics.upstream_latency.labels(self.name, kind).observe(time.monotonic() - started)
                    return response
                target = urljoin(url, response.headers["Location"])
                response.close()
                if urlsplit(target).scheme not in ("http", "https") or (url.startswith("https:") and target.startswith("http:")):
                    raise bad_gateway(
                        f"upstream {self.name} redirected {what} to {target[:200]!r}, which the proxy does not follow"
                    )
                if urlsplit(target).netloc != urlsplit(url).netloc:
                    sent.pop("Authorization", None)  # a CDN gets a signed URL, not our token
                url = target
            raise bad_gateway(f"upstream {self.name} redirected {what} more than {MAX_REDIRECTS} times")
        except TimeoutError:
            self.metrics.upstream_errors.labels(self.name, "timeout").inc()
            raise gateway_timeout(f"upstream {self.name} did not answer for {what} within {self.timeout:.0f} s") from None
        except aiohttp.ClientConnectorCertificateError as e:
            self.metrics.upstream_errors.labels(self.name, "tls").inc()
            raise bad_gateway(f"TLS verification failed talking to upstream {self.name}: {e.certificate_error}") from None
        except aiohttp.ClientConnectorError as e:
            self.metrics.upstream_errors.labels(self.name, "unreachable").inc()
            reason = e.os_error.strerror if e.os_error and e.os_error.strerror else str(e)
            host = urlsplit(url).netloc
            if host != urlsplit(self.upstream.url).netloc:  # name the host that failed, not the one that sent us there
                raise bad_gateway(f"{host} is unreachable: {reason} (upstream {self.name} redirected {what} there)") from None
            raise bad_gateway(f"upstream {self.name} ({self.upstream.url}) is unreachable: {reason}") from None
        except aiohttp.ClientError as e:
            self.metrics.upstream_errors.labels(self.name, "connection").inc()
            raise bad_gateway(f"upstream {self.name} failed {what}: {str(e)[:200] or type(e).__name__}") from None

    async def _error(self, response: aiohttp.ClientResponse, kind: str, what: str, client_auth: str | None) -> ProxyError:
        detail = await _upstream_detail(response)
        status = response.status
        self.metrics.upstream_errors.labels(self.name, str(status)).inc()
        if status == 404:
            return unknown(kind, f"{what} on upstream {self.name}", detail)
        if status == 401:
            if self.upstream.pass_credentials:
                return ProxyError(
                    401,
                    "UNAUTHORIZED",
                    f"upstream {self.name} needs credentials for {what}; log in to this proxy with your {self.name} credentials",
                    detail,
                    headers={"WWW-Authenticate": f'Basic realm="liftoff proxy for {self.name}"'},
                )
            path = self.auth.credentials.path
            return denied(
                f"upstream {self.name} refused the proxy's credentials for {what}; add them to {path} "
                f"(docker login {self.name}) or pass clients' credentials through with --pass-credentials {self.name}"
            )
        if status == 403:
            return ProxyError(403, "DENIED", f"upstream {self.name} denied access to {what}", detail)
        if status == 429:
            headers = {"Retry-After": response.headers["Retry-After"]} if "Retry-After" in response.headers else None
            return ProxyError(429, "TOOMANYREQUESTS", f"upstream {self.name} is rate-limiting requests ({what})", detail, headers)
        return bad_gateway(f"upstream {self.name} answered {status} for {what}", detail=detail)


async def _upstream_detail(response: aiohttp.ClientResponse) -> object:
    """The upstream's first error ({code, message}) or a snippet of its body, for the client's detail."""
    try:
        body = await response.content.read(MAX_ERROR_BODY)
    except (aiohttp.ClientError, TimeoutError):
        return None
    try:
        doc = load_json(body, "upstream error")
    except FormatError:
        doc = None
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        return {"upstream": {k: errors[0].get(k) for k in ("code", "message") if k in errors[0]}}
    text = body[:200].decode(errors="replace").strip()
    return {"upstream": text} if text else None
