"""The compaction loop: watch, wait for calm, plan, execute, back off after failures.

Each step takes a snapshot and tracks the cluster's *scaling signature* (deployment targets, the
alive nodes, the replica set). Any change restarts a stability window: compaction only plans once
the cluster has been unchanged for that long and is stable (every deployment HEALTHY at target,
no replica in transition, no node draining). A failed or aborted execution backs off exponentially.
A restarted controller first finishes or rolls back the plan its predecessor journaled.

Usable from the CLI (`liftoff compact run`) or as a Ray actor (`start_actor`), pinned to the head
node so that compaction never drains the node it runs on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from serve_integration.compaction.cluster import ClusterError, Pricing, RayCluster
from serve_integration.compaction.executor import Executor, ExecutorConfig, Outcome, WaveOutcome
from serve_integration.compaction.metrics import Metrics
from serve_integration.compaction.model import ClusterState
from serve_integration.compaction.planner import Budget, NodeType, Plan, plan, seconds_of_day
from serve_integration.compaction.providers import NodeProvider, RayAutoscalerProvider
from serve_integration.compaction.state import Journal, KVStore, StateStore

log = logging.getLogger(__name__)


@dataclass
class ControllerConfig:
    interval_s: float = 30.0
    stability_window_s: float = 120.0
    backoff_initial_s: float = 60.0
    backoff_max_s: float = 3600.0
    dry_run: bool = False
    budget: Budget = field(default_factory=Budget)
    method: str = "auto"
    time_limit_s: float = 10.0
    node_types: tuple[NodeType, ...] = ()
    min_graceful_shutdown_s: float = 60.0
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    # Pass node-swap advice on to the autoscaler (ray.autoscaler.sdk.request_resources); the next plans
    # then drain the replaced nodes onto the new ones. Off: advice is only reported.
    act_on_advice: bool = False
    advice_timeout_s: float = 900.0


@dataclass
class StepResult:
    action: str  # waiting | planned | advised | executed | recovered | error
    reason: str = ""
    plan: Plan | None = None
    outcome: Outcome | None = None
    state: ClusterState | None = None  # the snapshot the plan was made from

    def to_dict(self) -> dict:
        return {
            "action": self.action,
            "reason": self.reason,
            "plan": self.plan.to_dict() if self.plan else None,
            "outcome": self.outcome.to_dict() if self.outcome else None,
        }


def signature(state: ClusterState) -> tuple:
    """What changes on a scaling event: targets, alive nodes, the replica set."""
    return (
        tuple(sorted((d.key, d.target_replicas) for d in state.deployments.values())),
        tuple(sorted(n for n, node in state.nodes.items() if node.alive)),
        tuple(sorted(r.replica_id for r in state.replicas)),
    )


def decide(now: float, last_change_at: float, window_s: float, stable: bool, why: str, backoff_until: float) -> tuple[bool, str]:
    """Whether to plan now (pure: the loop's timing rules in one place)."""
    if now < backoff_until:
        return False, f"backing off after a failure for {backoff_until - now:.0f}s more"
    if not stable:
        return False, f"cluster not stable: {why}"
    calm = now - last_change_at
    if calm < window_s:
        return False, f"waiting for the stability window: {calm:.0f}s of {window_s:.0f}s since the last scaling event"
    return True, ""


class Controller:
    def __init__(
        self,
        cluster: RayCluster,
        provider: NodeProvider | None = None,
        store: StateStore | None = None,
        config: ControllerConfig | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.cluster = cluster
        self.provider = provider or RayAutoscalerProvider()
        self.config = config or ControllerConfig()
        self.metrics = metrics or Metrics()
        self.journal = Journal(store or KVStore(cluster), cluster_id=cluster.cluster_id())
        self.clock = clock
        self.executor = Executor(cluster, self.provider, self.journal, self.config.executor, self.config.budget, self._on_wave)
        self._signature: tuple | None = None
        self.last_change_at = clock()
        self.failures = 0
        self.backoff_until = 0.0
        self.recovered = False
        self.last: StepResult | None = None
        self.advice_requested_at: float | None = None

    def _on_wave(self, wave: WaveOutcome) -> None:
        if wave.ok:
            self.metrics.nodes_released.inc(len(wave.released))
            self.metrics.saved.inc(wave.savings_per_hour)
            self.metrics.migrations.inc(wave.migrations)
            if wave.reason:
                self.metrics.failures.labels("release").inc()
        else:
            self.metrics.failures.labels("abort").inc()

    def _failed(self, reason: str) -> None:
        self.failures += 1
        delay = min(self.config.backoff_initial_s * 2 ** (self.failures - 1), self.config.backoff_max_s)
        self.backoff_until = self.clock() + delay
        log.warning("compaction failed (%s); backing off %.0fs", reason, delay)

    def recover(self) -> StepResult | None:
        """Finish or roll back a plan a previous controller left in flight (once, at start)."""
        self.recovered = True
        record = self.journal.load()
        if record is None:
            return None
        if record.get("cluster_id") and record["cluster_id"] != self.journal.cluster_id:
            log.warning("discarding an in-flight record from another cluster (%s)", record["cluster_id"][:12])
            self.journal.clear()
            return None
        log.info(
            "found an in-flight compaction (phase %s, wave %s) from %s",
            record.get("phase"),
            record.get("wave"),
            record.get("owner"),
        )
        outcome = self.executor.recover(record)
        if outcome.status == "aborted" and not outcome.released:
            self._failed(outcome.reason)
        return StepResult("recovered", f"{outcome.status}: {outcome.reason}", outcome=outcome)

    def plan_now(self, state: ClusterState | None = None) -> Plan:
        """A plan for the cluster as it is (no timing rules, nothing executed)."""
        state = state or self.cluster.snapshot()
        c = self.config
        p = plan(
            state,
            c.budget.at(seconds_of_day(time.time())),  # a time-of-day window in force overrides the budget
            method=c.method,
            time_limit_s=c.time_limit_s,
            node_types=c.node_types,
            min_graceful_shutdown_s=c.min_graceful_shutdown_s,
        )
        self.metrics.plan_savings.set(p.savings_per_hour)
        self.metrics.plan_gap.set(p.gap)
        return p

    def step(self) -> StepResult:
        """One iteration of the loop."""
        try:
            if not self.recovered:
                result = self.recover()
                if result is not None:
                    self.last = result
                    self._signature = None
                    self.last_change_at = self.clock()
                    return result
            state = self.cluster.snapshot()
            self.metrics.cost.set(state.cost_per_hour())
            sig = signature(state)
            now = self.clock()
            if sig != self._signature:
                self._signature = sig
                self.last_change_at = now
            stable, why = state.stable()
            go, reason = decide(now, self.last_change_at, self.config.stability_window_s, stable, why, self.backoff_until)
            if not go:
                self.last = StepResult("waiting", reason)
                return self.last
            p = self.plan_now(state)
            self._expire_advice()
            wants_nodes = p.empty and p.advice and self.config.act_on_advice and not self.config.dry_run
            if wants_nodes and self.advice_requested_at is None:
                self.request_nodes(p)
                self.last = StepResult("advised", p.advice[0].text, plan=p, state=state)
                return self.last
            if p.empty or self.config.dry_run:
                self.metrics.plans.labels("empty" if p.empty else "dry_run").inc()
                self.last = StepResult("planned", "dry run" if self.config.dry_run else "; ".join(p.notes), plan=p, state=state)
                return self.last
            outcome = self.executor.execute(p, state)
            self.metrics.plans.labels(outcome.status).inc()
            if self.advice_requested_at is not None:
                self.clear_request()  # the new nodes, if they came, are in use now
            if outcome.status == "aborted":
                self._failed(outcome.reason)
            elif outcome.released:
                self.failures = 0
            self._signature = None  # our own migrations are a scaling event
            self.last = StepResult("executed", outcome.reason, plan=p, outcome=outcome, state=state)
            return self.last
        except ClusterError as e:
            self.metrics.failures.labels("error").inc()
            self._failed(str(e))
            self.last = StepResult("error", str(e))
            return self.last

    def request_nodes(self, p: Plan) -> None:
        """Ask the autoscaler for the node types the advice names (label selectors pin the type)."""
        from ray.autoscaler.sdk import request_resources

        types = {t.name: t for t in self.config.node_types}
        bundles, selectors = [], []
        for name, k in sorted(p.advice[0].launch.items()):
            t = types[name]
            for _ in range(k):
                bundles.append(dict(t.resources))
                selectors.append(dict(t.labels) or {"ray.io/node-group": name})
        request_resources(bundles=bundles, bundle_label_selectors=selectors)
        self.advice_requested_at = self.clock()
        log.info("asked the autoscaler for %s", ", ".join(f"{k} x {n}" for n, k in sorted(p.advice[0].launch.items())))

    def clear_request(self) -> None:
        """Withdraw the standing request_resources call."""
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[])
        self.advice_requested_at = None

    def _expire_advice(self) -> None:
        waited = self.clock() - self.advice_requested_at if self.advice_requested_at is not None else 0.0
        if waited > self.config.advice_timeout_s:
            log.warning("the autoscaler did not act on the node-swap advice within %.0fs; withdrawing it", waited)
            self.clear_request()

    def run(
        self, once: bool = False, stop: threading.Event | None = None, on_step: Callable[[StepResult], None] | None = None
    ) -> StepResult:
        """Loop until `stop` is set; with once=True, until a plan was executed (or found empty)."""
        stop = stop or threading.Event()
        while True:
            result = self.step()
            if on_step:
                on_step(result)
            if once and result.action in ("planned", "executed"):
                return result
            if once and result.action == "error" and self.failures >= 3:
                return result
            if stop.wait(self._sleep_for(result)):
                return result

    def _sleep_for(self, result: StepResult) -> float:
        if result.action == "waiting" and self.backoff_until <= self.clock():
            remaining = self.config.stability_window_s - (self.clock() - self.last_change_at)
            if 0 < remaining < self.config.interval_s:
                return max(0.2, remaining)
        if result.action == "recovered":
            return 0.0
        return self.config.interval_s


# --------------------------------------------------------------------------------------------------
# As a Ray actor
# --------------------------------------------------------------------------------------------------


class CompactionControllerActor:
    """The controller inside the cluster: `start()` runs the loop in a thread; `plan()` is a dry run."""

    def __init__(self, config: ControllerConfig, pricing: Pricing | None = None, provider: NodeProvider | None = None):
        self.cluster = RayCluster(pricing=pricing)
        self.controller = Controller(self.cluster, provider, KVStore(self.cluster), config)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def plan(self) -> dict:
        return self.controller.plan_now().to_dict()

    def step(self) -> dict:
        return self.controller.step().to_dict()

    def start(self) -> bool:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self.controller.run, kwargs={"stop": self._stop}, daemon=True)
            self._thread.start()
        return True

    def stop(self) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        return True

    def status(self) -> dict:
        c = self.controller
        return {
            "running": bool(self._thread and self._thread.is_alive()),
            "failures": c.failures,
            "backoff_until": c.backoff_until,
            "last": c.last.to_dict() if c.last else None,
            "nodes_released": c.metrics.value("liftoff_compaction_nodes_released_total"),
            "saved_dollars_per_hour": c.metrics.value("liftoff_compaction_saved_dollars_per_hour_total"),
            "migrations": c.metrics.value("liftoff_compaction_migrations_total"),
        }


def start_actor(
    config: ControllerConfig | None = None,
    pricing: Pricing | None = None,
    name: str = "liftoff-compaction",
    namespace: str = "liftoff",
    detached: bool = False,
):
    """Start the controller as a Ray actor on the head node (the one node compaction never drains)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = next((n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"]), None)
    if head is None:
        raise ClusterError("no alive head node found to run the compaction controller on")
    options = {
        "name": name,
        "namespace": namespace,
        "num_cpus": 0,
        "max_concurrency": 4,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(head, soft=False),
    }
    if detached:
        options["lifetime"] = "detached"
    actor_cls = ray.remote(CompactionControllerActor)
    return actor_cls.options(**options).remote(config or ControllerConfig(), pricing)
