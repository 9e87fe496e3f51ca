"""Prometheus metrics of the snapshot service: requests by method and status, and latencies."""

from __future__ import annotations

import logging

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from layerstore.errors import LiftoffError

log = logging.getLogger(__name__)

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The service's collectors, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "liftoff_snapshotter_requests",
            "Snapshots API requests handled, by method and gRPC status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "liftoff_snapshotter_request_duration_seconds",
            "Time to answer a Snapshots API request, by method",
            ["method"],
            buckets=_BUCKETS,
            registry=self.registry,
        )

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """Count one request and its latency."""
        self.requests.labels(method, code.name).inc()
        self.latency.labels(method).observe(seconds)

    def serve(self, address: str) -> None:
        """Expose /metrics over HTTP on `address` (HOST:PORT, :PORT for every interface)."""
        host, port = parse_address(address)
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise LiftoffError(f"cannot serve metrics on {address}: {e.strerror or e}") from e
        log.info("metrics on http://%s:%d/metrics", host or "0.0.0.0", port)


def parse_address(address: str) -> tuple[str, int]:
    """("host", port) from HOST:PORT, [V6]:PORT or :PORT (host "" means every interface)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise LiftoffError(f"bad metrics address {address!r}: expected HOST:PORT or :PORT, e.g. 127.0.0.1:9183")
    return host.strip("[]"), int(port)
