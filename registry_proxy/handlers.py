"""The distribution API's read side: /v2/, manifests, blobs and tags, answered from the cache or upstream."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, BinaryIO

import aiohttp
from aiohttp import web
from yarl import URL

from layerstore.errors import FormatError
from layerstore.jsondoc import load_json
from registry_proxy import sending
from registry_proxy.auth import identity_of
from registry_proxy.errors import ProxyError, StreamBroken, bad_gateway
from registry_proxy.inflight import Download, SharedCalls
from registry_proxy.routes import Route, parse_route, pick_upstream
from registry_proxy.source import TOKEN_HEADER
from registry_proxy.upstream import UpstreamClient

if TYPE_CHECKING:
    from registry_proxy.server import Proxy

API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
SMALL_BLOB = 1 << 20  # smaller blobs are verified before the first byte is sent, so errors arrive as JSON
MAX_TAGS_BODY = 16 << 20
BodySender = Callable[[web.StreamResponse, int, int], Awaitable[None]]  # (response, start, length)


class V2Handler:
    """Answers /v2/ requests for one Proxy; `request["liftoff"]` collects what the access log and metrics report."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.shared = SharedCalls()  # upstream questions asked by many clients at once, asked once

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        note = request["liftoff"]
        route = parse_route(request.method, request.raw_path, request.path)
        note["kind"] = route.kind
        internal = self._internal(request)
        if internal:
            note["by"] = "converter"
        if route.kind == "base":
            return self._base(request)
        client = self.proxy.client(pick_upstream(self.proxy.config, request.query.getall("ns", [])))
        note["upstream"] = client.name
        client_auth = request.headers.get("Authorization") if client.upstream.pass_credentials and not internal else None
        if not internal:
            await self.proxy.access.check_client(client, route.repository, client_auth)
        if route.kind == "manifest":
            return await self._manifest(request, route, client, client_auth, internal)
        if route.kind == "blob":
            return await self._blob(request, route, client, client_auth)
        return await self._tags(request, route, client, client_auth)

    def _internal(self, request: web.Request) -> bool:
        """A request from the proxy's own conversion children (they carry its secret token)."""
        token = request.headers.get(TOKEN_HEADER)
        return bool(token) and hmac.compare_digest(token, self.proxy.token)

    def _base(self, request: web.Request) -> web.Response:
        default = self.proxy.config.default
        if default.pass_credentials and "Authorization" not in request.headers:
            raise ProxyError(
                401, "UNAUTHORIZED", f"log in with your {default.name} credentials",
                headers={"WWW-Authenticate": f'Basic realm="liftoff proxy for {default.name}"'},
            )  # fmt: skip
        return web.json_response({}, headers=API_VERSION)

    # Manifests

    async def _manifest(
        self, request: web.Request, route: Route, client: UpstreamClient, client_auth: str | None, internal: bool
    ) -> web.Response:
        manifest = await self.proxy.manifests.get(client, route.repository, route.reference, client_auth)
        request["liftoff"]["source"] = manifest.source
        if not internal and self.proxy.trigger is not None:
            tag = None if route.by_digest else route.reference
            self.proxy.trigger.manifest_served(client.name, route.repository, tag, manifest)
        headers = {
            **API_VERSION,
            "Content-Type": manifest.media_type,
            "Docker-Content-Digest": manifest.digest,
            "ETag": f'"{manifest.digest}"',
        }
        if manifest.source == "stale":
            headers["Warning"] = '110 liftoff-proxy "Response is Stale"'
        if sending.not_modified(request, manifest.digest):
            return web.Response(status=304, headers=headers)
        if request.method == "GET":
            request["liftoff"]["bytes"] = len(manifest.body)
        return web.Response(body=manifest.body, headers=headers)

    # Blobs

    async def _blob(
        self, request: web.Request, route: Route, client: UpstreamClient, client_auth: str | None
    ) -> web.StreamResponse:
        proxy, digest, repository = self.proxy, route.reference, route.repository
        note = request["liftoff"]
        # A download in flight for this repository answers for it (bytes or the upstream's 404); a cached blob,
        # or one on its way for another repository, is served only once the upstream confirms this one has it.
        confirm = digest in proxy.cache or (
            digest in proxy.fetcher.active and not proxy.fetcher.joinable(client, repository, digest, client_auth)
        )
        if confirm:
            await self._confirm(client, repository, digest, client_auth)
        headers = {**API_VERSION, **sending.blob_headers(digest)}
        if sending.not_modified(request, digest) and confirm:
            return web.Response(status=304, headers=headers)
        opened = proxy.cache.open(digest)
        if opened is not None:
            stream, size = opened
            note["source"] = "cache"
            proxy.metrics.cache.labels("blob", "hit").inc()
            with stream:
                return await self._send(
                    request, headers, size, lambda response, start, length: self._copy(request, response, stream, start, length)
                )
        if request.method == "HEAD":
            return await self._head_upstream(request, route, client, client_auth, headers)
        download, reader, joined = proxy.fetcher.fetch(client, repository, digest, client_auth)
        note["source"] = "joined" if joined else "upstream"
        proxy.metrics.cache.labels("blob", "joined" if joined else "miss").inc()
        try:
            await download.wait_started()
            if download.total is None or download.total <= SMALL_BLOB:
                await download.wait_verified()
            size = download.total if download.total is not None else download.written
            return await self._send(
                request,
                headers,
                size,
                lambda response, start, length: self._follow(request, response, download, reader, start, length),
            )
        finally:
            download.close_reader(reader)

    async def _confirm(self, client: UpstreamClient, repository: str, digest: str, client_auth: str | None) -> None:
        """The upstream has `digest` in `repository` (one HEAD however many clients ask at once); ProxyError if not."""
        if self.proxy.access.linked(client.name, repository, digest):
            return
        key = ("confirm", client.name, repository, digest, identity_of(client_auth))
        await self.shared.run(key, lambda: self.proxy.access.confirm(client, repository, digest, "blob", client_auth))

    async def _send(self, request: web.Request, headers: dict[str, str], size: int, body: BodySender) -> web.StreamResponse:
        start, length, partial = sending.parse_range(request.headers.get("Range"), size)
        response = await sending.start_body(request, headers, size, start, length, partial)
        request["liftoff"]["response"] = response
        if request.method != "HEAD" and length:
            await body(response, start, length)
            request["liftoff"]["bytes"] = length
        await response.write_eof()
        return response

    async def _copy(self, request: web.Request, response: web.StreamResponse, stream: BinaryIO, start: int, length: int) -> None:
        await sending.send_file(request, response, stream, start, length)

    async def _follow(
        self, request: web.Request, response: web.StreamResponse, download: Download, reader: BinaryIO, start: int, length: int
    ) -> None:
        """Send [start, start+length) of a download as it arrives; cut the connection if it fails."""
        position, end = start, start + length
        while position < end:
            try:
                limit = await download.wait_beyond(position)
            except ProxyError as e:
                request["liftoff"]["error"] = e.message
                raise StreamBroken(e.message) from None
            count = min(limit, end) - position
            if count > 0:
                await sending.send_file(request, response, reader, position, count)
                position += count

    async def _head_upstream(
        self, request: web.Request, route: Route, client: UpstreamClient, client_auth: str | None, headers: dict
    ) -> web.StreamResponse:
        """HEAD of a blob not cached: ask the upstream, fetch nothing."""
        active = self.proxy.fetcher.active.get(route.reference)
        size = active.total if active is not None and active.started else None
        if size is None:
            key = ("head", client.name, route.repository, route.reference, identity_of(client_auth))
            size = await self.shared.run(key, lambda: self._head(client, route.repository, route.reference, client_auth))
        request["liftoff"]["source"] = "upstream"
        answer = web.StreamResponse(status=200, headers=headers)
        if size is not None:
            answer.content_length = size
        await answer.prepare(request)
        await answer.write_eof()
        return answer

    async def _head(self, client: UpstreamClient, repository: str, digest: str, client_auth: str | None) -> int | None:
        """The upstream's HEAD of a blob: its size (None if not given); ProxyError if the upstream lacks it."""
        what, path = f"blob {digest} of {repository}", f"/v2/{repository}/blobs/{digest}"
        response = await client.send("HEAD", path, repository, "blob", what, client_auth=client_auth)
        response.release()
        self.proxy.access.link(client.name, repository, digest)
        return response.content_length

    # Tags

    async def _tags(self, request: web.Request, route: Route, client: UpstreamClient, client_auth: str | None) -> web.Response:
        query = {k: v for k, v in request.query.items() if k in ("n", "last")}
        what = f"the tags of {route.repository}"
        response = await client.send(
            "GET", f"/v2/{route.repository}/tags/list", route.repository, "tags", what, client_auth=client_auth, query=query
        )
        try:
            body = await response.content.read(MAX_TAGS_BODY + 1)
        except (aiohttp.ClientError, TimeoutError):
            raise bad_gateway(f"upstream {client.name} broke off {what}") from None
        finally:
            response.release()
        if len(body) > MAX_TAGS_BODY:
            raise bad_gateway(
                f"upstream {client.name} sent more than {MAX_TAGS_BODY} bytes of tags for {route.repository}; page with ?n="
            )
        try:
            load_json(body, f"the tag list of {route.repository} from upstream {client.name}")
        except FormatError as e:
            raise bad_gateway(str(e)) from None
        headers = {**API_VERSION, "Content-Type": "application/json"}
        link = response.headers.get("Link")
        if link and link.startswith("</v2/") and "ns" in request.query:
            target, _, rest = link[1:].partition(">")
            headers["Link"] = f"<{URL(target).update_query(ns=request.query['ns'])}>{rest}"
        elif link and link.startswith("</v2/"):
            headers["Link"] = link
        return web.Response(body=body, headers=headers)
