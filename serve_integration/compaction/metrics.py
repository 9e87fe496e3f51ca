"""Prometheus metrics of the compaction controller (its own registry, so several can coexist)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.nodes_released = Counter("liftoff_compaction_nodes_released", "Nodes emptied and handed back", registry=r)
        self.saved = Counter(
            "liftoff_compaction_saved_dollars_per_hour", "Sum of hourly prices of the nodes released", registry=r
        )
        self.migrations = Counter("liftoff_compaction_migrations", "Replicas migrated off drained nodes", registry=r)
        self.failures = Counter("liftoff_compaction_failures", "Aborted waves and failed steps", ["reason"], registry=r)
        self.plans = Counter("liftoff_compaction_plans", "Plans made", ["outcome"], registry=r)
        self.cost = Gauge("liftoff_compaction_cluster_dollars_per_hour", "Hourly price of the nodes in the cluster", registry=r)
        self.plan_savings = Gauge(
            "liftoff_compaction_plan_savings_dollars_per_hour", "Savings the latest plan promised", registry=r
        )
        self.plan_gap = Gauge("liftoff_compaction_plan_gap_ratio", "Latest plan's gap to the LP lower bound", registry=r)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Expose /metrics over HTTP."""
        start_http_server(port, addr=addr, registry=self.registry)

    def value(self, name: str, labels: dict | None = None) -> float:
        """Current value of a sample (tests, status)."""
        v = self.registry.get_sample_value(name, labels or {})
        return float(v or 0.0)
