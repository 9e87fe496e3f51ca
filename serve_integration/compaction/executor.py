"""Carrying a plan out with Ray's own mechanism: drain, let Serve migrate, watch, release.

For each wave of the plan:

1. Refuse the head node, and nodes that are gone or already draining.
2. Journal the wave (phase `draining`), *then* drain every node of the wave through the GCS
   (`GcsClient.drain_node`, reason PREEMPTION, which the raylet cannot refuse) with a deadline of
   now + the replicas' start timeout + their graceful shutdown + a margin. Serve sees the nodes as
   draining and migrates their replicas start-then-stop: replacements start elsewhere, and each old
   replica stops only once its replacement is RUNNING (or at the deadline).
3. Watch until no replica is left on the wave's nodes and every deployment is HEALTHY with its target
   number of RUNNING replicas elsewhere.
4. Journal `releasing` and hand each node to the node provider (a drained raylet exits on its own
   once idle; the provider makes sure the machine goes too).

If replacements do not come up in time (or an affected deployment stays UNHEALTHY), the wave is
aborted: each node is drained again with *no* deadline, so Serve never force-stops the old replicas
and they keep serving. Ray 2.60 has no call that cancels a drain, so the node stays unschedulable
until its replacements finally run (then it exits and a later run releases it) or its raylet is
restarted; it is never handed to the provider while it holds a replica.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from serve_integration.compaction.cluster import ClusterError, RayCluster
from serve_integration.compaction.model import ClusterState, Node
from serve_integration.compaction.planner import Budget, Plan, _place, _prepare
from serve_integration.compaction.providers import NodeProvider
from serve_integration.compaction.state import Journal

log = logging.getLogger(__name__)

UNHEALTHY = ("UNHEALTHY", "DEPLOY_FAILED")


@dataclass
class ExecutorConfig:
    replica_start_timeout_s: float = 600.0  # how long replacements may take to load their models
    drain_margin_s: float = 60.0
    unhealthy_grace_s: float = 60.0  # abort early once an affected deployment is UNHEALTHY this long
    release_timeout_s: float = 300.0
    poll_s: float = 1.0


@dataclass
class WaveOutcome:
    index: int
    nodes: list[str]
    ok: bool
    reason: str = ""
    released: list[str] = field(default_factory=list)
    migrations: int = 0
    savings_per_hour: float = 0.0
    duration_s: float = 0.0


@dataclass
class Outcome:
    status: str  # done | partial | aborted | nothing | rolled_back
    waves: list[WaveOutcome] = field(default_factory=list)
    reason: str = ""

    @property
    def released(self) -> list[str]:
        return [n for w in self.waves for n in w.released]

    @property
    def migrations(self) -> int:
        return sum(w.migrations for w in self.waves)

    @property
    def savings_per_hour(self) -> float:
        return sum(w.savings_per_hour for w in self.waves)

    def to_dict(self) -> dict:
        return {
            "status": self.status,
            "reason": self.reason,
            "released": self.released,
            "migrations": self.migrations,
            "savings_per_hour": self.savings_per_hour,
            "waves": [w.__dict__ for w in self.waves],
        }


class Executor:
    """Executes plans wave by wave; restart-safe through the journal."""

    def __init__(
        self,
        cluster: RayCluster,
        provider: NodeProvider,
        journal: Journal,
        config: ExecutorConfig | None = None,
        budget: Budget | None = None,
        on_wave: Callable[[WaveOutcome], None] | None = None,
    ):
        self.cluster = cluster
        self.provider = provider
        self.journal = journal
        self.config = config or ExecutorConfig()
        self.budget = budget or Budget()
        self.on_wave = on_wave

    # --- a fresh plan --------------------------------------------------------------------------
    def execute(self, plan: Plan, state: ClusterState) -> Outcome:
        if plan.empty:
            return Outcome("nothing", reason="; ".join(plan.notes))
        if plan.fingerprint != state.fingerprint():
            return Outcome("nothing", reason="the cluster changed since the plan was made; plan again")
        record = self.journal.begin(plan.to_dict())
        outcome = Outcome("done")
        for k, wave in enumerate(plan.waves):
            if k > 0:
                state = self.cluster.snapshot()
                ok, why = self.wave_still_valid(state, wave.nodes)
                if not ok:
                    outcome.status, outcome.reason = "partial", f"stopped before wave {k}: {why}"
                    break
            result = self.run_wave(record, k, wave.nodes, state)
            outcome.waves.append(result)
            if not result.ok:
                outcome.status, outcome.reason = "aborted", result.reason
                self.journal.update(record, phase="aborted", reason=result.reason)
                return outcome
        self.journal.update(record, phase="done")
        self.journal.clear()
        return outcome

    def wave_still_valid(self, state: ClusterState, nodes: list[str]) -> tuple[bool, str]:
        """Before a later wave: its nodes are still there and removable, and their replicas still fit elsewhere."""
        prob = _prepare(state, self.budget)
        for n in nodes:
            if n not in state.nodes:
                return False, f"node {n[:12]} has left the cluster"
            if n in prob.fixed_keep:
                return False, f"node {n[:12]} must now stay: {prob.fixed_keep[n]}"
            if state.nodes[n].draining:
                return False, f"node {n[:12]} is already draining"
        stable, why = state.stable()
        if not stable:
            return False, why
        items = [r.deployment for n in nodes for r in state.replicas_on(n)]
        targets = [n for n in prob.nodes if n not in nodes and not state.nodes[n].draining]
        free = {n: _free(prob, state, n) for n in targets}
        counts = {k: v for k, v in prob.count.items() if k[1] not in nodes}
        if _place(prob, items, targets, free, counts) is None:
            return False, "the replicas of the next wave no longer fit on the kept nodes"
        return True, ""

    def run_wave(self, record: dict, k: int, nodes: list[str], state: ClusterState) -> WaveOutcome:
        started = time.time()
        for n in nodes:
            node = state.nodes.get(n)
            if node is None:
                raise ClusterError(f"node {n[:12]} is not in the cluster")
            if node.is_head:
                raise ClusterError(f"refusing to drain the head node {n[:12]}: it runs the GCS and the Serve controller")
            if node.draining:
                raise ClusterError(f"node {n[:12]} is already draining (someone else's drain); plan again")
        on_nodes = [r for r in state.replicas if r.node_id in nodes]
        graceful = max([state.deployments[r.deployment].graceful_shutdown_timeout_s for r in on_nodes] or [20.0])
        budget_s = self.config.replica_start_timeout_s + graceful + self.config.drain_margin_s
        deadline_ms = int((started + budget_s) * 1000)
        wave_nodes = {n: state.nodes[n] for n in nodes}
        affected = sorted({r.deployment for r in on_nodes})
        self.journal.update(
            record,
            phase="draining",
            wave=k,
            nodes=list(nodes),
            deadline_ms=deadline_ms,
            wave_started_at=started,
            wave_nodes={n: _node_dict(v) for n, v in wave_nodes.items()},
            migrations=len(on_nodes),
            affected=affected,
        )
        for n in nodes:
            log.info(
                "wave %d: draining node %s (%d replicas, $%.2f/h), deadline in %.0fs",
                k,
                n[:12],
                len(state.replicas_on(n)),
                state.nodes[n].price_per_hour,
                budget_s,
            )
            self.cluster.drain(n, deadline_ms, f"liftoff compaction wave {k}: migrating Serve replicas to cheaper nodes")
        return self.watch_and_release(record, k, wave_nodes, started, len(on_nodes))

    # --- watching, releasing, aborting --------------------------------------------------------
    def watch_and_release(
        self, record: dict, k: int, wave_nodes: dict[str, Node], started: float, migrations: int
    ) -> WaveOutcome:
        nodes = list(wave_nodes)
        abort_at = started + self.config.replica_start_timeout_s
        unhealthy_since: dict[str, float] = {}
        affected: set[str] = set(record.get("affected") or [])
        while True:
            snap = self.cluster.snapshot()
            left = [r for r in snap.replicas if r.node_id in wave_nodes]
            affected |= {r.deployment for r in left}
            healthy, why = _healthy_at_target(snap, exclude=set(nodes), only=affected)
            if not left and healthy:
                break
            now = time.time()
            for d in sorted(affected):
                dep = snap.deployments.get(d)
                if dep is not None and _failing(dep):
                    unhealthy_since.setdefault(d, now)
                    if now - unhealthy_since[d] >= self.config.unhealthy_grace_s:
                        what = f"{d} is {dep.status}" if dep.status in UNHEALTHY else f"replacements of {d} fail to start"
                        return self.abort(record, k, wave_nodes, started, f"{what}: {_last_line(dep.message) or 'no message'}")
                else:
                    unhealthy_since.pop(d, None)
            if now >= abort_at:
                waiting = ", ".join(sorted({r.deployment for r in left})) or why
                return self.abort(
                    record,
                    k,
                    wave_nodes,
                    started,
                    f"replacements did not come up within {self.config.replica_start_timeout_s:g}s ({waiting})",
                )
            time.sleep(self.config.poll_s)
        self.journal.update(record, phase="releasing", wave=k)
        return self.release(record, k, wave_nodes, started, migrations)

    def release(self, record: dict, k: int, wave_nodes: dict[str, Node], started: float, migrations: int) -> WaveOutcome:
        released: list[str] = []
        problems: list[str] = []
        for n, node in wave_nodes.items():
            try:
                self.provider.release(node, self.cluster)
            except ClusterError as e:
                problems.append(str(e))
                continue
            if self.provider.wait_released(n, self.cluster, self.config.release_timeout_s):
                released.append(n)
            else:
                problems.append(f"node {n[:12]} is empty but still in the cluster after {self.config.release_timeout_s:g}s")
        done = sorted(set(record.get("released") or []) | set(released))
        self.journal.update(record, released=done, phase="released", wave=k)
        out = WaveOutcome(
            index=k,
            nodes=list(wave_nodes),
            ok=True,
            reason="; ".join(problems),
            released=released,
            migrations=migrations,
            savings_per_hour=sum(wave_nodes[n].price_per_hour for n in released),
            duration_s=time.time() - started,
        )
        if self.on_wave:
            self.on_wave(out)
        return out

    def abort(self, record: dict, k: int, wave_nodes: dict[str, Node], started: float, reason: str) -> WaveOutcome:
        alive = self.cluster.alive_nodes()
        lifted = []
        for n in wave_nodes:
            if n in alive:
                # No un-drain in Ray 2.60: lift the deadline so Serve never force-stops the old replicas.
                self.cluster.drain(n, 0, f"liftoff compaction aborted: {reason[:200]}")
                lifted.append(n[:12])
        msg = (
            f"aborted wave {k}: {reason}. Node(s) {', '.join(lifted) or '-'} keep draining with no deadline, so their "
            "replicas keep serving; Ray 2.60 cannot cancel a drain: they leave once Serve's replacements run, "
            "or restart their raylet to return them to service"
        )
        log.warning(msg)
        self.journal.update(record, phase="aborted", wave=k, reason=msg)
        out = WaveOutcome(index=k, nodes=list(wave_nodes), ok=False, reason=msg, duration_s=time.time() - started)
        if self.on_wave:
            self.on_wave(out)
        return out

    # --- after a restart ----------------------------------------------------------------------
    def recover(self, record: dict) -> Outcome:
        """Finish or roll back whatever a previous controller left in flight."""
        phase = record.get("phase")
        plan = Plan.from_dict(record["plan"])
        k = int(record.get("wave", -1))
        if phase == "planned":
            self.journal.clear()
            return Outcome("rolled_back", reason="the previous controller stopped before draining anything; plan discarded")
        if phase in ("done",):
            self.journal.clear()
            return Outcome("nothing", reason="the previous plan had finished")
        wave_nodes = {n: Node(**v) for n, v in (record.get("wave_nodes") or {}).items()}
        draining = self.cluster.draining()
        alive = self.cluster.alive_nodes()
        if phase == "aborted":
            # Nodes whose replacements have since come up: empty, still draining (or gone). Release them.
            snap = self.cluster.snapshot()
            empty = {n: v for n, v in wave_nodes.items() if n not in alive or (n in draining and not snap.replicas_on(n))}
            outcome = Outcome("aborted", reason=record.get("reason", ""))
            if empty:
                outcome.waves.append(self.release(record, k, empty, time.time(), 0))
            if all(n in empty for n in wave_nodes):
                self.journal.clear()
            return outcome
        if phase == "draining":
            touched = {n: v for n, v in wave_nodes.items() if n in draining or n not in alive}
            if not touched:
                self.journal.clear()
                return Outcome("rolled_back", reason=f"wave {k} was journaled but no drain reached the GCS; plan discarded")
            log.info("resuming wave %d of the previous controller: %d node(s) draining", k, len(touched))
            result = self.watch_and_release(
                record, k, touched, float(record.get("wave_started_at") or time.time()), int(record.get("migrations") or 0)
            )
        elif phase in ("releasing", "released"):
            pending = {n: v for n, v in wave_nodes.items() if n not in (record.get("released") or [])}
            result = self.release(
                record, k, pending, float(record.get("wave_started_at") or time.time()), int(record.get("migrations") or 0)
            )
        else:
            self.journal.clear()
            return Outcome("rolled_back", reason=f"unknown phase {phase!r} in the in-flight record; discarded")
        outcome = Outcome("resumed" if result.ok else "aborted", waves=[result], reason=result.reason)
        if result.ok:
            remaining = len(plan.waves) - (k + 1)
            if remaining > 0:
                outcome.reason = (
                    f"finished wave {k}; {remaining} later wave(s) dropped (the next plan starts from a fresh snapshot)"
                )
            self.journal.clear()
        return outcome


def _failing(dep) -> bool:
    """Serve reports the deployment unhealthy, or that its new replicas fail to start (their first health check)."""
    return dep.status in UNHEALTHY or "failed to start" in dep.message


def _last_line(message: str) -> str:
    """The gist of a Serve status message: its first line and the exception at the end of its traceback."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    return lines[0][:200] if len(lines) == 1 else f"{lines[0][:160]} ... {lines[-1][:200]}"


def _free(prob, state: ClusterState, n: str) -> dict[str, float]:
    from serve_integration.compaction.model import subtract

    return subtract(prob.capacity[n], state.used(n))


def _healthy_at_target(state: ClusterState, exclude: set[str], only: set[str]) -> tuple[bool, str]:
    """The deployments a wave touched are HEALTHY with their target RUNNING off the wave's nodes."""
    for d in state.deployments.values():
        if d.key not in only:
            continue
        if not d.healthy:
            return False, f"{d.key} is {d.status}"
        running = sum(1 for r in state.replicas if r.deployment == d.key and r.state == "RUNNING" and r.node_id not in exclude)
        if running < d.target_replicas:
            return False, f"{d.key} has {running}/{d.target_replicas} replicas running off the draining nodes"
    return True, ""


def _node_dict(node: Node) -> dict:
    from dataclasses import asdict

    return asdict(node)
