"""Prometheus metrics of the proxy: requests, bytes, cache hits, upstream latency, conversion queue."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ProxyMetrics:
    """The proxy's collectors, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "liftoff_proxy_requests",
            "Requests answered, by route kind, method and status",
            ["kind", "method", "status"],
            registry=r,
        )
        self.bytes_sent = Counter(
            "liftoff_proxy_sent_bytes",
            "Body bytes sent to clients, by route kind and where they came from",
            ["kind", "source"],
            registry=r,
        )
        self.cache = Counter(
            "liftoff_proxy_cache_lookups",
            "Blob and manifest lookups in the cache, by kind and result (hit, miss, joined)",
            ["kind", "result"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "liftoff_proxy_upstream_request_duration_seconds",
            "Time from sending a request upstream to its response headers, by upstream and kind",
            ["upstream", "kind"],
            buckets=_LATENCY,
            registry=r,
        )
        self.upstream_bytes = Counter(
            "liftoff_proxy_upstream_bytes", "Blob bytes received from upstreams", ["upstream"], registry=r
        )
        self.upstream_errors = Counter(
            "liftoff_proxy_upstream_errors",
            "Failed upstream requests and broken blob transfers, by upstream and reason",
            ["upstream", "reason"],
            registry=r,
        )
        self.cache_bytes = Gauge("liftoff_proxy_cache_bytes", "Bytes of blobs in the disk cache", registry=r)
        self.cache_capacity = Gauge("liftoff_proxy_cache_capacity_bytes", "The disk cache's cap", registry=r)
        self.evictions = Counter("liftoff_proxy_cache_evictions", "Blobs evicted from the disk cache (LRU)", registry=r)
        self.stale = Counter(
            "liftoff_proxy_stale_tags_served", "Tags served from the cache past their TTL because the upstream failed", registry=r
        )
        self.conversions = Counter("liftoff_proxy_conversions", "Finished conversion attempts, by result", ["result"], registry=r)
        self._queue_counts: Callable[[], dict[str, int]] = dict
        r.register(_QueueCollector(self))

    def hit_ratio(self) -> float:
        """Blob cache hits (joined downloads count as hits: no extra upstream fetch) over lookups."""
        hits = misses = 0.0
        for metric in self.cache.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.labels.get("kind") == "blob":
                    if sample.labels["result"] == "miss":
                        misses += sample.value
                    else:
                        hits += sample.value
        return hits / (hits + misses) if hits + misses else 0.0

    def watch_queue(self, counts: Callable[[], dict[str, int]]) -> None:
        """Report the conversion queue's length by state from `counts()` at each scrape."""
        self._queue_counts = counts

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _QueueCollector(Collector):
    def __init__(self, metrics: ProxyMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        queue = GaugeMetricFamily(
            "liftoff_proxy_conversion_queue", "Conversion jobs by state (queued, running, done, failed)", labels=["state"]
        )
        counts = self.metrics._queue_counts()
        for state in ("queued", "running", "done", "failed"):
            queue.add_metric([state], counts.get(state, 0))
        yield queue
        yield GaugeMetricFamily(
            "liftoff_proxy_cache_hit_ratio", "Blob cache hit ratio since start", value=self.metrics.hit_ratio()
        )
