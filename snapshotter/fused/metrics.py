"""The FUSE daemon's Prometheus metrics and health endpoint (`liftoff fused --metrics-address`).

One HTTP server: `/metrics` (Prometheus text) and `/healthz` (200 once the views are restored and
the control socket accepts connections, else 503 with the reason). Counts come from what the daemon
keeps anyway (fetcher and cache statistics, each FUSE session's request counts), read at scrape
time; per-store bytes and latencies from the stores the fetcher calls, wrapped here.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from layerstore.errors import LiftoffError, ObjectNotFound
from snapshotter.fuse_server import opcode_name
from snapshotter.metrics import parse_address

if TYPE_CHECKING:
    from snapshotter.fused.daemon import FuseDaemon
    from snapshotter.prefetch import ProfileChunk

log = logging.getLogger(__name__)

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0)
MAX_PREFETCH_IMAGES = 256  # images whose profile progress is reported (the oldest are dropped)


class StoreMetrics:
    """Per-store request latency and bytes of chunk fetches (the stores the fetcher calls, wrapped)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.latency = Histogram(
            "liftoff_fused_store_request_duration_seconds",
            "Time of one chunk request to a store, by store and outcome (ok, missing, error)",
            ["store", "outcome"],
            buckets=_BUCKETS,
            registry=registry,
        )
        self.bytes: dict[str, int] = {}
        self._lock = threading.Lock()

    def wrap(self, store: Any) -> Any:
        """`store` with its single_attempt() copies timed (what ChunkFetcher calls get() on)."""
        return _TimedStore(store, self)

    def observe(self, url: str, outcome: str, seconds: float, size: int) -> None:
        self.latency.labels(url, outcome).observe(seconds)
        if size:
            with self._lock:
                self.bytes[url] = self.bytes.get(url, 0) + size


class _TimedStore:
    """Delegates to a store; get() is timed and its bytes counted."""

    def __init__(self, store: Any, metrics: StoreMetrics) -> None:
        self._store = store
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def single_attempt(self, timeout: float) -> _TimedStore:
        return _TimedStore(self._store.single_attempt(timeout), self._metrics)

    def get(self, key: str) -> bytes:
        started = time.monotonic()
        try:
            data = self._store.get(key)
        except ObjectNotFound:
            self._metrics.observe(self._store.url, "missing", time.monotonic() - started, 0)
            raise
        except Exception:
            self._metrics.observe(self._store.url, "error", time.monotonic() - started, 0)
            raise
        self._metrics.observe(self._store.url, "ok", time.monotonic() - started, len(data))
        return data


class FusedCollector(Collector):
    """The daemon's counts, read when scraped."""

    def __init__(self, daemon: FuseDaemon, stores: StoreMetrics) -> None:
        self.daemon = daemon
        self.stores = stores
        self.profiles: dict[str, list[ProfileChunk]] = {}  # image -> its startup profile (prefetch progress)

    def prefetching(self, image: str | None, profile: list[ProfileChunk] | None) -> None:
        """An image's profile prefetch started (progress: how many of its chunks are cached)."""
        if image and profile:
            self.profiles.pop(image, None)
            self.profiles[image] = list(profile)
            while len(self.profiles) > MAX_PREFETCH_IMAGES:
                self.profiles.pop(next(iter(self.profiles)))

    def collect(self) -> Iterator[Any]:
        daemon = self.daemon
        stats = daemon.fetcher.stats
        fetches = CounterMetricFamily("liftoff_fused_chunk_fetches", "Chunks fetched from a store, by store", labels=["store"])
        for url, n in sorted(dict(stats.per_store).items()):
            fetches.add_metric([url], n)
        yield fetches
        fetched = CounterMetricFamily(
            "liftoff_fused_chunk_fetched_bytes", "Stored (compressed) bytes of the chunks fetched, by store", labels=["store"]
        )
        for url, n in sorted(dict(self.stores.bytes).items()):
            fetched.add_metric([url], n)
        yield fetched
        yield CounterMetricFamily("liftoff_fused_cache_hits", "Chunk reads answered from the local cache", value=stats.cache_hits)
        yield CounterMetricFamily(
            "liftoff_fused_cache_misses",
            "Chunks the cache lacked and a store was asked for (one per chunk however many readers waited)",
            value=stats.chunks + stats.failures,
        )
        yield CounterMetricFamily("liftoff_fused_cache_evictions", "Chunks evicted from the cache", value=daemon.cache.evictions)
        yield GaugeMetricFamily("liftoff_fused_cache_bytes", "Bytes in the chunk cache", value=daemon.cache.used)
        yield GaugeMetricFamily("liftoff_fused_cache_capacity_bytes", "The chunk cache's cap", value=daemon.cache.capacity)
        yield CounterMetricFamily(
            "liftoff_fused_fetch_retries", "Rounds of store requests repeated after failures", value=stats.retries
        )
        yield CounterMetricFamily(
            "liftoff_fused_fetch_failures", "Chunks no store served within the retry budget (reads got EIO)", value=stats.failures
        )
        views = daemon.views.all()
        requests: dict[str, int] = {}
        eio = 0
        for view in views:
            for opcode, n in list(view.session.requests.items()):
                name = opcode_name(opcode)
                requests[name] = requests.get(name, 0) + n
            eio += getattr(view.session, "eio", 0)
        by_opcode = CounterMetricFamily(
            "liftoff_fused_requests", "FUSE requests of the views served now, by opcode", labels=["opcode"]
        )
        for name, n in sorted(requests.items()):
            by_opcode.add_metric([name], n)
        yield by_opcode
        yield CounterMetricFamily("liftoff_fused_eio_replies", "FUSE requests of the views served now answered EIO", value=eio)
        yield GaugeMetricFamily("liftoff_fused_views", "Views served", value=len(views))
        prefetch = daemon.prefetcher.stats
        yield CounterMetricFamily(
            "liftoff_fused_prefetch_profile_chunks", "Startup-profile chunks prefetched", value=prefetch["profile_chunks"]
        )
        yield CounterMetricFamily(
            "liftoff_fused_prefetch_fill_chunks", "Chunks fetched by the background fill", value=prefetch["fill_chunks"]
        )
        progress = GaugeMetricFamily(
            "liftoff_fused_prefetch_image_chunks",
            "Chunks of an image's startup profile: total, and cached now",
            labels=["image", "state"],
        )
        cache = daemon.cache
        for image, profile in list(self.profiles.items()):
            progress.add_metric([image, "total"], len(profile))
            progress.add_metric([image, "cached"], sum(1 for c in profile if c.sha256 in cache))
        yield progress


class FusedMetrics:
    """The registry, the store timings and the collector of one daemon."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.stores = StoreMetrics(self.registry)
        self.collector: FusedCollector | None = None
        self.control_socket: Path | None = None
        self.ready = False
        self.status = "starting: restoring views"

    def attach(self, daemon: FuseDaemon) -> None:
        """Report `daemon`'s counts."""
        self.collector = FusedCollector(daemon, self.stores)
        self.registry.register(self.collector)

    def prefetching(self, image: str | None, profile: list[ProfileChunk] | None) -> None:
        if self.collector is not None:
            self.collector.prefetching(image, profile)

    def serving(self, control_socket: Path) -> None:
        """Views restored and the control socket listens: /healthz answers 200 while it accepts connections."""
        self.control_socket = control_socket
        self.ready = True

    def health(self) -> tuple[int, str]:
        """(HTTP status, reason) of /healthz."""
        if not self.ready or self.control_socket is None:
            return 503, self.status
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2.0)
        try:
            probe.connect(str(self.control_socket))
        except OSError as e:
            return 503, f"control socket {self.control_socket}: {e.strerror or e}"
        finally:
            probe.close()
        return 200, "ok"

    def serve(self, address: str) -> ThreadingHTTPServer:
        """Serve /metrics and /healthz on `address` (HOST:PORT, :PORT for every interface) in a thread."""
        host, port = parse_address(address)
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    status, body, kind = 200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST
                elif path in ("/healthz", "/readyz", "/livez"):
                    status, reason = metrics.health()
                    body, kind = (reason + "\n").encode(), "text/plain; charset=utf-8"
                else:
                    status, body, kind = 404, b"not found: /metrics or /healthz\n", "text/plain; charset=utf-8"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("http: " + format, *args)

        ThreadingHTTPServer.allow_reuse_address = True
        try:
            server = ThreadingHTTPServer((host, port), Handler)
        except OSError as e:
            raise LiftoffError(f"cannot serve metrics on {address}: {e.strerror or e}") from e
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        log.info("metrics on http://%s:%d/metrics, health on /healthz", host or "0.0.0.0", server.server_address[1])
        return server
