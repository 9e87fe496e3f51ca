"""The proxy process: its state, the aiohttp application, and running it until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import time

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from layerstore import __version__
from layerstore.errors import LiftoffError
from layerstore.oci.auth import DockerCredentials
from layerstore.stores import open_stores
from layerstore.systemd import notify_systemd
from registry_proxy.access import Access
from registry_proxy.auth import UpstreamAuth
from registry_proxy.blobcache import BlobCache
from registry_proxy.config import ProxyConfig, Upstream, parse_listen
from registry_proxy.db import open_db
from registry_proxy.errors import ProxyError, StreamBroken
from registry_proxy.handlers import API_VERSION, V2Handler
from registry_proxy.inflight import BlobFetcher
from registry_proxy.manifests import ManifestCache
from registry_proxy.metrics import ProxyMetrics
from registry_proxy.queue import STATES, ConversionQueue
from registry_proxy.trigger import ConversionTrigger
from registry_proxy.upstream import UpstreamClient
from registry_proxy.workers import ConversionWorkers

log = logging.getLogger(__name__)
access_log = logging.getLogger("registry_proxy.access")

USER_AGENT = f"liftoff-proxy/{__version__}"


class Proxy:
    """Everything a running proxy holds: caches, upstream clients, the conversion queue and workers."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.metrics = ProxyMetrics()
        try:
            config.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LiftoffError(f"cannot create --cache-dir {config.cache_dir}: {e.strerror}") from None
        self.db = open_db(config.cache_dir / "state.db")
        self.cache = BlobCache(config.cache_dir, config.cache_size, self.metrics)
        self.access = Access(self.db)
        self.manifests = ManifestCache(self.db, self.access, self.metrics, config.tag_ttl, config.max_manifest_bytes)
        self.fetcher = BlobFetcher(self.cache, self.metrics, self.access.link, self.config.fetch_timeout)
        self.queue = ConversionQueue(self.db, config.convert_retries, config.retry_backoff)
        self.metrics.watch_queue(self.queue.counts)
        self.credentials = DockerCredentials(config.docker_config)
        self.stores = open_stores(config.stores, **config.store_options) if config.stores else []
        self.token = secrets.token_hex(16)
        self.session: aiohttp.ClientSession | None = None
        self.clients: dict[str, UpstreamClient] = {}
        self.workers: ConversionWorkers | None = None
        self.trigger: ConversionTrigger | None = None

    async def start(self, own_url: str) -> None:
        """Open the upstream sessions and start the conversion workers (with stores only)."""
        connector = aiohttp.TCPConnector(limit=256, limit_per_host=64, ttl_dns_cache=300)
        self.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, read_bufsize=4 << 20, headers={"User-Agent": USER_AGENT}, trust_env=False
        )
        timeout = self.config.upstream_timeout
        for upstream in self.config.upstreams:
            auth = UpstreamAuth(upstream, self.credentials, self.session, timeout)
            self.clients[upstream.name] = UpstreamClient(upstream, self.session, auth, timeout, self.metrics)
        if self.stores:
            self.workers = ConversionWorkers(self.queue, self.config, self.stores, own_url, self.token, self.metrics)
            self.trigger = ConversionTrigger(self.queue, self.config.platforms, self.workers.wake)
            self.workers.start()

    def client(self, upstream: Upstream) -> UpstreamClient:
        return self.clients[upstream.name]

    async def close(self) -> None:
        if self.workers is not None:
            await self.workers.stop()
        await self.fetcher.close()
        if self.session is not None:
            await self.session.close()
        for store in self.stores:
            store.close()
        self.db.close()


def build_app(proxy: Proxy) -> web.Application:
    """The aiohttp application: /v2/ (the distribution API), /liftoff/v1/conversions, /metrics."""
    v2 = V2Handler(proxy)

    async def handle(request: web.Request) -> web.StreamResponse:
        path = request.path
        if request.raw_path.startswith("/") and not path.startswith("/v2") and request.method in ("GET", "HEAD"):
            if path == "/metrics":
                request["liftoff"]["kind"] = "metrics"
                return web.Response(body=proxy.metrics.render(), content_type="text/plain", charset="utf-8")
            if path == "/liftoff/v1/conversions":
                request["liftoff"]["kind"] = "conversions"
                return _conversions(proxy, request)
            if path == "/healthz":
                return web.json_response({"ok": True})
        return await v2(request)

    app = web.Application(middlewares=[_observe(proxy)], handler_args={"max_field_size": 16384})
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def _conversions(proxy: Proxy, request: web.Request) -> web.Response:
    state = request.query.get("state")
    if state is not None and state not in STATES:
        raise ProxyError(400, "UNSUPPORTED", f"unknown state {state!r}: one of {', '.join(STATES)}")
    try:
        limit = max(1, min(1000, int(request.query.get("limit", "100"))))
    except ValueError:
        raise ProxyError(400, "UNSUPPORTED", "limit must be a number") from None
    body = {"enabled": proxy.workers is not None, "counts": proxy.queue.counts(), "jobs": proxy.queue.jobs(state, limit)}
    return web.json_response(body)


def _observe(proxy: Proxy) -> Middleware:
    """Middleware: errors as the distribution API's JSON, a cut connection for broken streams, access log, metrics."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        note = request["liftoff"] = {"kind": "invalid", "source": "-", "bytes": 0}
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except ProxyError as e:
            status = e.status
            note["error"] = e.message
            body = e.body() if request.method != "HEAD" else None
            return web.Response(status=e.status, body=body, content_type="application/json", headers={**API_VERSION, **e.headers})
        except (StreamBroken, ConnectionError) as e:
            # 599: the access log's mark for a response cut off mid-body; 499: the client went away
            status = 599 if isinstance(e, StreamBroken) else 499
            if request.transport is not None:
                request.transport.abort()
            return note.get("response") or web.Response(status=status)  # aiohttp's write_eof meets the closed socket
        except web.HTTPException:
            raise
        except Exception as e:  # a bug: still the distribution API's error shape, and the trace in the log
            log.exception("%s %s failed", request.method, request.path_qs[:300])
            status = 500
            note["error"] = f"internal error: {type(e).__name__}"
            if "response" in note:  # headers already sent
                if request.transport is not None:
                    request.transport.abort()
                return note["response"]
            error = ProxyError(500, "UNKNOWN", f"internal error in the proxy ({type(e).__name__}); see its log")
            return web.Response(status=500, body=error.body(), content_type="application/json", headers=API_VERSION)
        finally:
            elapsed = time.monotonic() - started
            kind = note["kind"]
            proxy.metrics.requests.labels(kind, request.method, str(status)).inc()
            if note["bytes"]:
                proxy.metrics.bytes_sent.labels(kind, note["source"]).inc(note["bytes"])
            access_log.info(
                "%s %s %d kind=%s upstream=%s source=%s bytes=%d %.3fs%s%s",
                request.method,
                request.path_qs[:300],
                status,
                kind,
                note.get("upstream", "-"),
                note["source"],
                note["bytes"],
                elapsed,
                f" by={note['by']}" if "by" in note else "",
                f" error={note['error']!r}" if "error" in note else "",
            )

    return middleware


def own_url(host: str, port: int) -> str:
    """How the proxy's conversion children reach it."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(config: ProxyConfig) -> None:
    """Run the proxy until SIGTERM or SIGINT."""
    host, port = parse_listen(config.listen)
    proxy = Proxy(config)
    app = build_app(proxy)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        proxy.db.close()
        raise LiftoffError(f"cannot listen on {config.listen}: {e.strerror or e}; choose another --listen") from None
    await proxy.start(own_url(host, port))
    upstreams = ", ".join(f"{u.name}={u.url}" for u in config.upstreams)
    conversions = f"converting into {', '.join(config.stores)}" if config.stores else "conversion off (no --store)"
    log.info(
        "liftoff proxy on http://%s:%d for %s; cache %s (cap %d bytes); %s",
        host,
        port,
        upstreams,
        config.cache_dir,
        config.cache_size,
        conversions,
    )
    notify_systemd("READY=1")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        notify_systemd("STOPPING=1")
        await proxy.close()
        await runner.cleanup()
