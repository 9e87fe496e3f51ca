"""Trace-driven simulation of compaction policies on a Ray Serve cluster.

The same traffic traces drive four runs of one cluster model:

- `none`: Serve's autoscaling and the cluster autoscaler's idle termination only;
- `ray`: plus Ray Serve 2.60's built-in compaction (the `raypolicy` model: one node at a time, the
  largest that fits on the other non-idle nodes, after 300 s of stability, completed when the
  autoscaler releases the idle node after its idle timeout);
- `liftoff`: plus the liftoff controller (the real `planner.plan`, stability window, budgets, waves;
  drained nodes leave as soon as they are empty);
- `optimum`: every step, every replica instantly repacked onto the cheapest feasible node set
  (`planner.optimum`, no migration time, no budget): a floor no real policy reaches.

Model: Serve-style autoscaling per deployment (desired = demand / (per-replica throughput x target
utilization), upscale after 30 s, downscale after 600 s above/below target), Serve's pack placement
(best fit on non-idle nodes first), Serve's downscale order (nodes with the fewest replicas first,
newest replicas first), a cluster autoscaler that launches the node type best utilized by the
pending replicas (boot delay), idle termination, and start-then-stop migrations whose replacements
take the model's load time. Throughput: a running replica serves up to its tokens/s.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field, replace

from serve_integration.compaction.model import ClusterState, Deployment, Node, Replica, fits, selector_matches, subtract
from serve_integration.compaction.planner import Budget, NodeType, optimum, plan
from serve_integration.compaction.raypolicy import COMPACTION_TIMEOUT_S, NODE_COMPACTION_DELAY_S, find_node_to_compact


@dataclass
class SimDeployment:
    name: str
    gpus: int
    tokens_per_s: float  # one replica at full load
    pattern: str  # diurnal | bursty | decaying | flat | csv (the scenario's traffic file)
    peak_tps: float
    base_tps: float
    min_replicas: int = 1
    max_replicas: int = 64
    phase_h: float = 0.0  # diurnal: hour of the peak
    start_h: float = 0.0  # decaying: launch time
    half_life_h: float = 6.0
    load_time_s: float = 120.0
    selector: dict[str, str] | None = None
    resources: dict[str, float] = field(default_factory=dict)  # besides GPUs: CPU, memory, custom
    max_replicas_per_node: int | None = None
    target_utilization: float | None = None  # None: the scenario's
    upscale_delay_s: float | None = None
    downscale_delay_s: float | None = None

    @property
    def demand(self) -> dict[str, float]:
        """What one replica asks of a node."""
        out = {k: float(v) for k, v in self.resources.items() if v}
        if self.gpus:
            out["GPU"] = float(self.gpus)
        return out


@dataclass
class Scenario:
    node_types: list[NodeType]
    deployments: list[SimDeployment]
    hours: float = 48.0
    step_s: float = 60.0
    seed: int = 7
    boot_s: float = 300.0
    idle_timeout_s: float = 300.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    target_utilization: float = 0.7
    head_price: float = 0.384
    liftoff_window_s: float = 120.0
    liftoff_interval_s: float = 60.0
    budget: Budget = field(default_factory=Budget)
    name: str = "default"
    boot_s_by_type: dict[str, float] = field(default_factory=dict)  # per node type; else boot_s
    start_s: float = 0.0  # time of day at t=0 (budget windows)
    # Measured traffic: deployment -> [(seconds from the start, tokens/s)], interpolated onto the steps.
    traces: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    seeds: tuple[int, ...] = (1, 2, 3)
    max_delay_s: float = 30.0  # queueing delay a token may see and still count as served in time
    karpenter_budget_fraction: float = 0.10  # Karpenter's default disruption budget: 10% of nodes
    karpenter_consolidate_after_s: float = 60.0

    def boot_time(self, node_type: str) -> float:
        return self.boot_s_by_type.get(node_type, self.boot_s)


def default_scenario(hours: float = 48.0, step_s: float = 60.0, seed: int = 7) -> Scenario:
    """Six models of 1, 2 and 4 GPUs, diurnal/bursty/decaying traffic, L4 and A100 node types at on-demand prices."""
    a100 = {"ray.io/accelerator-type": "A100"}
    l4 = {"ray.io/accelerator-type": "L4"}
    types = [
        NodeType("g6.xlarge", {"GPU": 1.0, "CPU": 4.0}, 0.805, l4),
        NodeType("g6.12xlarge", {"GPU": 4.0, "CPU": 48.0}, 4.602, l4),
        NodeType("g6.48xlarge", {"GPU": 8.0, "CPU": 192.0}, 13.35, l4),
        NodeType("p4d.24xlarge", {"GPU": 8.0, "CPU": 96.0}, 32.77, a100),
    ]
    deps = [
        SimDeployment("chat-8b", 1, 2400.0, "diurnal", 38000.0, 4000.0, min_replicas=2, phase_h=14.0),
        SimDeployment("embed", 1, 9000.0, "bursty", 60000.0, 9000.0, min_replicas=1),
        SimDeployment("code-34b", 2, 1500.0, "diurnal", 14000.0, 1200.0, min_replicas=1, phase_h=10.0, load_time_s=240.0),
        SimDeployment(
            "summarize-13b",
            2,
            2000.0,
            "decaying",
            22000.0,
            1000.0,
            min_replicas=1,
            start_h=3.0,
            half_life_h=5.0,
            load_time_s=180.0,
        ),
        SimDeployment(
            "chat-70b",
            4,
            1200.0,
            "diurnal",
            7000.0,
            900.0,
            min_replicas=1,
            phase_h=15.0,
            load_time_s=420.0,
            selector={"ray.io/accelerator-type": "A100"},
        ),
        SimDeployment("rerank", 1, 6000.0, "bursty", 30000.0, 2500.0, min_replicas=1),
    ]
    return Scenario(types, deps, hours=hours, step_s=step_s, seed=seed)


def demand_traces(sc: Scenario) -> dict[str, list[float]]:
    """Tokens/s demanded per deployment at each step (seeded)."""
    rng = random.Random(sc.seed)
    steps = int(sc.hours * 3600 / sc.step_s)
    out: dict[str, list[float]] = {}
    for d in sc.deployments:
        series = []
        spikes: list[tuple[float, float, float]] = []  # start_h, end_h, amplitude
        if d.pattern == "bursty":
            t = 0.0
            while t < sc.hours:
                t += rng.expovariate(1 / 3.0)  # a burst every ~3 h
                spikes.append((t, t + rng.uniform(0.3, 1.2), rng.uniform(0.3, 1.0) * (d.peak_tps - d.base_tps)))
        noise = [rng.gauss(1.0, 0.05) for _ in range(steps)]
        if d.pattern == "csv":
            out[d.name] = _resample(sc.traces[d.name], steps, sc.step_s)
            continue
        for k in range(steps):
            h = k * sc.step_s / 3600
            if d.pattern == "diurnal":
                x = 0.5 + 0.5 * math.cos(2 * math.pi * (h - d.phase_h) / 24)
                v = d.base_tps + (d.peak_tps - d.base_tps) * x**2
            elif d.pattern == "bursty":
                v = d.base_tps + sum(a for s, e, a in spikes if s <= h < e)
            elif d.pattern == "decaying":
                v = (
                    d.base_tps
                    if h < d.start_h
                    else d.base_tps + (d.peak_tps - d.base_tps) * 0.5 ** ((h - d.start_h) / d.half_life_h)
                )
            else:
                v = d.base_tps
            series.append(max(0.0, v * noise[k]))
        out[d.name] = series
    return out


def _resample(points: list[tuple[float, float]], steps: int, step_s: float) -> list[float]:
    """Linear interpolation of (seconds, value) samples at each step; held flat outside the samples."""
    pts = sorted(points)
    out = []
    j = 0
    for k in range(steps):
        t = k * step_s
        while j + 1 < len(pts) and pts[j + 1][0] <= t:
            j += 1
        if t <= pts[0][0]:
            v = pts[0][1]
        elif j + 1 >= len(pts):
            v = pts[-1][1]
        else:
            (t0, v0), (t1, v1) = pts[j], pts[j + 1]
            v = v0 + (v1 - v0) * (t - t0) / (t1 - t0) if t1 > t0 else v1
        out.append(max(0.0, v))
    return out


# --------------------------------------------------------------------------------------------------
# The cluster model
# --------------------------------------------------------------------------------------------------


@dataclass
class SNode:
    id: str
    type: NodeType
    ready_at: float
    is_head: bool = False
    draining: bool = False  # no new replicas (a drain, Ray's compaction target, a Karpenter cordon)
    release_when_empty: bool = False  # a drained raylet exits at once (liftoff, ray-active, Karpenter)
    idle_since: float | None = None


@dataclass
class SReplica:
    id: str
    dep: str
    node: str | None
    state: str  # pending | loading | running
    ready_at: float = 0.0
    replaces: str | None = None  # a migration replacement for this old replica
    started_at: float = 0.0


class Sim:
    def __init__(self, sc: Scenario, traces: dict[str, list[float]]):
        self.sc = sc
        self.traces = traces
        self.deps = {d.name: d for d in sc.deployments}
        self.nodes: dict[str, SNode] = {}
        self.replicas: dict[str, SReplica] = {}
        self.targets = {d.name: d.min_replicas for d in sc.deployments}
        self.above_since: dict[str, float | None] = {d: None for d in self.deps}
        self.below_since: dict[str, float | None] = {d: None for d in self.deps}
        self._ids = 0
        self.t = 0.0
        self.dollars = 0.0
        self.node_seconds = 0.0
        self.gpu_seconds = 0.0
        self.tokens = 0.0
        self.demand_tokens = 0.0
        self.in_time_tokens = 0.0  # demand that met a queueing delay <= sc.max_delay_s
        self.backlog = {d: 0.0 for d in self.deps}
        self.max_delay_s = 0.0
        self.migrations = 0
        self.released_by_policy = 0
        self.launched_by_policy = 0
        self.series: dict[str, list[float]] = {"t_h": [], "cost_per_hour": [], "nodes": []}
        head = NodeType("head", {"CPU": 8.0}, sc.head_price)
        self.nodes["head"] = SNode("head", head, 0.0, is_head=True)
        for name in self.deps:
            for _ in range(self.targets[name]):
                self._new_replica(name)

    def _id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}{self._ids:06d}"

    def _new_replica(self, dep: str, replaces: str | None = None) -> SReplica:
        r = SReplica(self._id("r"), dep, None, "pending", replaces=replaces, started_at=self.t)
        self.replicas[r.id] = r
        return r

    def launch(self, t: NodeType) -> SNode:
        """A new node of this type, ready after its boot time."""
        nid = self._id("n")
        self.nodes[nid] = SNode(nid, t, self.t + self.sc.boot_time(t.name))
        return self.nodes[nid]

    # --- views ---------------------------------------------------------------------------------
    def ready(self, n: SNode) -> bool:
        return n.ready_at <= self.t

    def on_node(self, node_id: str) -> list[SReplica]:
        return [r for r in self.replicas.values() if r.node == node_id]

    def free(self, node_id: str) -> dict[str, float]:
        """Room left on a node."""
        out = dict(self.nodes[node_id].type.resources)
        for r in self.on_node(node_id):
            out = subtract(out, self.deps[r.dep].demand)
        return out

    def free_gpus(self, node_id: str) -> float:
        return self.free(node_id).get("GPU", 0.0)

    def matches(self, dep: str, node: SNode) -> bool:
        sel = self.deps[dep].selector
        return not sel or selector_matches(node.type.labels, sel)

    def room_for(self, dep: str, node_id: str) -> bool:
        """The node admits one more replica of dep: resources and max_replicas_per_node."""
        d = self.deps[dep]
        if not fits(self.free(node_id), d.demand):
            return False
        if d.max_replicas_per_node:
            return sum(1 for r in self.on_node(node_id) if r.dep == dep) < d.max_replicas_per_node
        return True

    def logical_count(self, dep: str) -> int:
        """Replicas counting a migration pair once."""
        replaced = {r.replaces for r in self.replicas.values() if r.replaces}
        return sum(1 for r in self.replicas.values() if r.dep == dep and r.id not in replaced)

    def cluster_state(self) -> ClusterState:
        nodes = {}
        for n in self.nodes.values():
            if not self.ready(n):
                continue
            nodes[n.id] = Node(
                n.id,
                n.type.price_per_hour,
                dict(n.type.resources),
                labels=dict(n.type.labels),
                is_head=n.is_head,
                draining=n.draining,
                node_type=n.type.name,
            )
        deps = {}
        for d in self.sc.deployments:
            dep = Deployment(
                "sim",
                d.name,
                d.demand,
                self.targets[d.name],
                d.min_replicas,
                max_replicas_per_node=d.max_replicas_per_node,
                label_selectors=(d.selector,) if d.selector else (),
                load_time_s=d.load_time_s,
            )
            deps[dep.key] = dep
        reps = [
            Replica(
                r.id,
                f"sim/{r.dep}",
                r.node,
                "RUNNING" if r.state == "running" else "STARTING",
                r.ready_at if r.state == "running" else None,
            )
            for r in self.replicas.values()
            if r.node is not None and r.node in nodes
        ]
        return ClusterState(nodes, deps, reps, taken_at=self.t, scheduling="pack")

    def stable(self) -> bool:
        if any(r.state != "running" or r.replaces for r in self.replicas.values()):
            return False
        if any(n.draining for n in self.nodes.values()):
            return False
        return all(self.logical_count(d) == self.targets[d] for d in self.deps)

    def time_of_day(self) -> float:
        return (self.sc.start_s + self.t) % 86400.0

    # --- one step ------------------------------------------------------------------------------
    def advance(self, k: int, policy: Policy) -> None:
        sc = self.sc
        self.t = k * sc.step_s
        for r in list(self.replicas.values()):
            if r.state == "loading" and r.ready_at <= self.t:
                r.state = "running"
                if r.replaces:
                    self.replicas.pop(r.replaces, None)
                    r.replaces = None
        self._autoscale(k)
        self._reconcile()
        self._place()
        self._launch()
        policy.act(self)
        self._release()
        self._account(k)

    def _autoscale(self, k: int) -> None:
        sc = self.sc
        for name, d in self.deps.items():
            demand = self.traces[name][k]
            target = d.target_utilization or sc.target_utilization
            desired = max(d.min_replicas, min(d.max_replicas, math.ceil(demand / (d.tokens_per_s * target))))
            up = sc.upscale_delay_s if d.upscale_delay_s is None else d.upscale_delay_s
            down = sc.downscale_delay_s if d.downscale_delay_s is None else d.downscale_delay_s
            cur = self.targets[name]
            if desired > cur:
                self.below_since[name] = None
                self.above_since[name] = self.above_since[name] if self.above_since[name] is not None else self.t
                if self.t - self.above_since[name] >= up:
                    self.targets[name] = desired
                    self.above_since[name] = None
            elif desired < cur:
                self.above_since[name] = None
                self.below_since[name] = self.below_since[name] if self.below_since[name] is not None else self.t
                if self.t - self.below_since[name] >= down:
                    self.targets[name] = desired
                    self.below_since[name] = None
            else:
                self.above_since[name] = self.below_since[name] = None

    def _reconcile(self) -> None:
        for name in self.deps:
            have = self.logical_count(name)
            want = self.targets[name]
            for _ in range(want - have):
                self._new_replica(name)
            if have > want:
                self._stop(name, have - want)

    def _stop(self, dep: str, n: int) -> None:
        """Serve's downscale order: not-running first, then nodes with the fewest replicas, newest first."""
        replaced = {r.replaces for r in self.replicas.values() if r.replaces}
        mine = [r for r in self.replicas.values() if r.dep == dep and r.id not in replaced and not r.replaces]
        per_node: dict[str | None, int] = {}
        for r in self.replicas.values():
            per_node[r.node] = per_node.get(r.node, 0) + 1
        order = sorted(
            mine,
            key=lambda r: (
                r.state == "running",
                self.nodes[r.node].is_head if r.node else False,
                per_node.get(r.node, 0),
                -r.started_at,
            ),
        )
        for r in order[:n]:
            self.replicas.pop(r.id, None)

    def _candidates(self, r: SReplica) -> list[str]:
        return [
            n.id
            for n in self.nodes.values()
            if self.ready(n) and not n.draining and not n.is_head and self.matches(r.dep, n) and self.room_for(r.dep, n.id)
        ]

    def _place(self) -> None:
        """Serve's pack scheduling: largest first, best fit on non-idle nodes, then on idle ones."""
        pending = sorted(
            (r for r in self.replicas.values() if r.state == "pending"), key=lambda r: (-self.deps[r.dep].gpus, r.id)
        )
        for r in pending:
            self.place_one(r, self._candidates(r))

    def place_one(self, r: SReplica, candidates: list[str]) -> bool:
        gpus = self.deps[r.dep].gpus
        busy = [n for n in candidates if self.on_node(n)]
        pool = busy or candidates
        if not pool:
            return False
        best = min(pool, key=lambda n: (self.free_gpus(n) - gpus, 0.0 if gpus else self.free(n).get("CPU", 0.0), n))
        r.node, r.state, r.ready_at = best, "loading", self.t + self.deps[r.dep].load_time_s
        self.nodes[best].idle_since = None
        return True

    def _launch(self) -> None:
        """The cluster autoscaler: pending replicas that booting nodes will not take get new nodes."""
        pending = sorted((r for r in self.replicas.values() if r.state == "pending"), key=lambda r: -self.deps[r.dep].gpus)
        if not pending:
            return
        booting = {n.id: self.free(n.id) for n in self.nodes.values() if not self.ready(n)}
        booked: dict[tuple[str, str], int] = {}
        waiting: list[SReplica] = []
        for r in pending:
            d = self.deps[r.dep]
            slot = None
            for b in sorted(booting):
                if not fits(booting[b], d.demand) or not self.matches(r.dep, self.nodes[b]):
                    continue
                have = sum(1 for x in self.on_node(b) if x.dep == r.dep) + booked.get((b, r.dep), 0)
                if d.max_replicas_per_node and have >= d.max_replicas_per_node:
                    continue
                slot = b
                break
            if slot is None:
                waiting.append(r)
            else:
                booting[slot] = subtract(booting[slot], d.demand)
                booked[(slot, r.dep)] = booked.get((slot, r.dep), 0) + 1
        while waiting:
            first = waiting[0]
            best = None
            for t in self.sc.node_types:
                probe = SNode("x", t, 0)
                if not self.matches(first.dep, probe) or not fits(t.resources, self.deps[first.dep].demand):
                    continue
                unit = "GPU" if t.resources.get("GPU", 0.0) > 0 else "CPU"
                room = dict(t.resources)
                count: dict[str, int] = {}
                took = []
                for r in waiting:
                    d = self.deps[r.dep]
                    if not self.matches(r.dep, probe) or not fits(room, d.demand):
                        continue
                    if d.max_replicas_per_node and count.get(r.dep, 0) >= d.max_replicas_per_node:
                        continue
                    room = subtract(room, d.demand)
                    count[r.dep] = count.get(r.dep, 0) + 1
                    took.append(r)
                total = t.resources.get(unit, 0.0) or 1.0
                used = total - room.get(unit, 0.0)
                key = (-used / total, t.price_per_hour)
                if best is None or key < best[0]:
                    best = (key, t, took)
            if best is None:
                raise ValueError(f"no node type can host a replica of {first.dep}: fix the scenario")
            _, t, took = best
            self.launch(t)
            waiting = [r for r in waiting if r not in took]

    def _release(self) -> None:
        for n in list(self.nodes.values()):
            if n.is_head or not self.ready(n):
                continue
            if self.on_node(n.id):
                n.idle_since = None
                continue
            if n.release_when_empty:
                self.nodes.pop(n.id)
                self.released_by_policy += 1
                continue
            if n.idle_since is None:
                n.idle_since = self.t
            if self.t - n.idle_since >= self.sc.idle_timeout_s:
                self.nodes.pop(n.id)

    def _account(self, k: int) -> None:
        dt = self.sc.step_s
        cost = 0.0
        for n in self.nodes.values():
            cost += n.type.price_per_hour
            self.node_seconds += dt if not n.is_head else 0.0
            self.gpu_seconds += n.type.resources.get("GPU", 0.0) * dt
        self.dollars += cost * dt / 3600
        self.series["t_h"].append(self.t / 3600)
        self.series["cost_per_hour"].append(cost)
        self.series["nodes"].append(float(sum(1 for n in self.nodes.values() if not n.is_head)))
        for name, d in self.deps.items():
            running = sum(1 for r in self.replicas.values() if r.dep == name and r.state == "running")
            demand = self.traces[name][k]
            capacity = running * d.tokens_per_s
            self.demand_tokens += demand * dt
            self.tokens += min(demand, capacity) * dt
            # A queue in front of the deployment: what capacity cannot take waits; a token arriving now waits
            # behind the backlog, so it is served in time if that backlog drains within max_delay_s.
            backlog = max(0.0, self.backlog[name] + (demand - capacity) * dt)
            self.backlog[name] = backlog
            delay = backlog / capacity if capacity > 0 else (math.inf if backlog > 0 or demand > 0 else 0.0)
            self.max_delay_s = max(self.max_delay_s, delay)
            if delay <= self.sc.max_delay_s:
                self.in_time_tokens += demand * dt

    # --- migrations (the compaction policies) --------------------------------------------------
    def migrate_off(self, node_id: str, targets: dict[str, str] | None = None) -> None:
        """Start a replacement for every replica on the node (start-then-stop)."""
        for r in list(self.on_node(node_id)):
            if r.replaces or any(x.replaces == r.id for x in self.replicas.values()):
                continue
            new = self._new_replica(r.dep, replaces=r.id)
            cands = self._candidates(new)
            want = (targets or {}).get(r.id)
            if want in cands:
                cands = [want]
            if not self.place_one(new, cands):
                continue  # stays pending: the autoscaler may launch a node for it
            self.migrations += 1

    def evict(self, node_id: str, targets: dict[str, str] | None = None) -> None:
        """Kubernetes eviction (stop-then-start): each replica stops now, a new one starts elsewhere and loads."""
        for r in list(self.on_node(node_id)):
            if r.replaces or any(x.replaces == r.id for x in self.replicas.values()):
                continue
            self.replicas.pop(r.id)
            new = self._new_replica(r.dep)
            cands = self._candidates(new)
            want = (targets or {}).get(r.id)
            if want in cands:
                cands = [want]
            self.place_one(new, cands)
            self.migrations += 1


# --------------------------------------------------------------------------------------------------
# Policies
# --------------------------------------------------------------------------------------------------


class Policy:
    name = "none"

    def act(self, sim: Sim) -> None:
        pass


class RayRule(Policy):
    """Serve 2.60's built-in compaction (see raypolicy)."""

    name = "ray"
    release_when_empty = False  # the autoscaler releases the emptied node after its idle timeout

    def __init__(self) -> None:
        self.compacting: str | None = None
        self.started = 0.0
        self.stable_since: float | None = None
        self.completed = 0

    def act(self, sim: Sim) -> None:
        stable = sim.stable()
        if stable and self.stable_since is None:
            self.stable_since = sim.t
        if not stable:
            self.stable_since = None
        if self.compacting is not None:
            if self.compacting not in sim.nodes:
                self.completed += 1
                self.compacting = None
            elif sim.t - self.started > COMPACTION_TIMEOUT_S:
                sim.nodes[self.compacting].draining = False
                self.compacting = None
            return
        if not stable or self.stable_since is None or sim.t - self.stable_since <= NODE_COMPACTION_DELAY_S:
            return
        step = find_node_to_compact(sim.cluster_state())
        if step is None:
            return
        self.compacting, self.started = step.node, sim.t
        sim.nodes[step.node].draining = True  # Serve keeps new replicas off the compaction target
        sim.nodes[step.node].release_when_empty = self.release_when_empty
        sim.migrate_off(step.node, step.assignment)


class RayActive(RayRule):
    """Ray's active node compaction as proposed in Ray PR #66108, with the node drained rather than left idle.

    The same choice as `ray` (every deployment healthy for the delay, no node draining; a worker whose
    replicas all fit on the other non-idle nodes; the largest such node, then the fewest replicas;
    start-then-stop), but the emptied node leaves as soon as it is empty, as a drain through the GCS
    makes it, instead of waiting out the autoscaler's idle timeout: the best case of Ray's rule.
    """

    name = "ray-active"
    release_when_empty = True


class Karpenter(Policy):
    """Karpenter-style consolidation, as it would act on the Ray nodes.

    After `consolidate_after_s` without pending replicas or node changes: empty nodes go first (deleted);
    then, cheapest-to-move first (fewest replicas, then the shortest reload), the first node whose
    replicas fit on the other nodes is deleted, or else replaced by the cheapest node type that holds
    them and costs less. Replace-then-evict: a replacement boots first; eviction is Kubernetes' (the pod
    stops, a new one starts and loads). At most `budget_fraction` of the worker nodes (rounded up)
    are being disrupted at once. Price-aware but one node at a time and never multi-node.
    """

    name = "karpenter"
    release_when_empty = True

    def __init__(self, budget_fraction: float = 0.10, consolidate_after_s: float = 60.0) -> None:
        self.fraction = budget_fraction
        self.after_s = consolidate_after_s
        self.sig: tuple | None = None
        self.changed_at = 0.0
        self.replacing: dict[str, str] = {}  # old node -> its booting replacement
        self.launched = 0

    def _disrupting(self, sim: Sim) -> int:
        return sum(1 for n in sim.nodes.values() if n.draining) + len(self.replacing)

    def act(self, sim: Sim) -> None:
        for old, new in list(self.replacing.items()):
            if old not in sim.nodes or new not in sim.nodes:
                self.replacing.pop(old)
                if old in sim.nodes:
                    sim.nodes[old].draining = False
            elif sim.ready(sim.nodes[new]):
                self.replacing.pop(old)
                sim.nodes[old].draining = sim.nodes[old].release_when_empty = True
                sim.evict(old, {r.id: new for r in sim.on_node(old)})
        workers = [n for n in sim.nodes.values() if not n.is_head]
        sig = (
            tuple(sorted(n.id for n in workers)),
            tuple(sorted((r.id, r.node or "", r.state) for r in sim.replicas.values())),
        )
        if sig != self.sig:
            self.sig, self.changed_at = sig, sim.t
        if sim.t - self.changed_at < self.after_s or any(r.state == "pending" for r in sim.replicas.values()):
            return
        allowed = math.ceil(self.fraction * len(workers)) - self._disrupting(sim)
        ready = [n for n in workers if sim.ready(n) and not n.draining and n.id not in self.replacing]
        for n in sorted((n for n in ready if not sim.on_node(n.id)), key=lambda n: (-n.type.price_per_hour, n.id)):
            if allowed <= 0:
                return
            n.draining = n.release_when_empty = True  # deleted in this step's release
            allowed -= 1
        if allowed <= 0:
            return

        def cost(n: SNode) -> tuple:
            reps = sim.on_node(n.id)
            return (len(reps), sum(sim.deps[r.dep].load_time_s for r in reps), -n.type.price_per_hour, n.id)

        busy = sorted((n for n in ready if sim.on_node(n.id)), key=cost)
        if any(r.state != "running" for r in sim.replicas.values()):
            return
        for n in busy:
            others = [m.id for m in ready if m.id != n.id and not m.draining]
            dest = self._fit(sim, n.id, others)
            if dest is not None:
                n.draining = n.release_when_empty = True
                sim.evict(n.id, dest)
                return
            t = self._cheaper_type(sim, n)
            if t is not None:
                new = sim.launch(t)
                self.launched += 1
                self.replacing[n.id] = new.id
                return

    def _fit(self, sim: Sim, node_id: str, others: list[str]) -> dict[str, str] | None:
        """Where the node's replicas would go on the other nodes (scheduling simulation), or None."""
        free = {m: sim.free(m) for m in others}
        count = {(m, r.dep): 0 for m in others for r in sim.on_node(m)}
        for m in others:
            for r in sim.on_node(m):
                count[(m, r.dep)] += 1
        out = {}
        for r in sorted(sim.on_node(node_id), key=lambda r: -sim.deps[r.dep].gpus):
            d = sim.deps[r.dep]
            ok = [
                m
                for m in others
                if fits(free[m], d.demand)
                and sim.matches(r.dep, sim.nodes[m])
                and not (d.max_replicas_per_node and count.get((m, r.dep), 0) >= d.max_replicas_per_node)
            ]
            if not ok:
                return None
            m = min(ok, key=lambda m: (free[m].get("GPU", 0.0) - d.gpus, m))
            free[m] = subtract(free[m], d.demand)
            count[(m, r.dep)] = count.get((m, r.dep), 0) + 1
            out[r.id] = m
        return out

    def _cheaper_type(self, sim: Sim, n: SNode) -> NodeType | None:
        reps = sim.on_node(n.id)
        best = None
        for t in sim.sc.node_types:
            if t.price_per_hour >= n.type.price_per_hour:
                continue
            room = dict(t.resources)
            per: dict[str, int] = {}
            ok = True
            for r in reps:
                d = sim.deps[r.dep]
                per[r.dep] = per.get(r.dep, 0) + 1
                if not sim.matches(r.dep, SNode("x", t, 0)) or not fits(room, d.demand):
                    ok = False
                    break
                if d.max_replicas_per_node and per[r.dep] > d.max_replicas_per_node:
                    ok = False
                    break
                room = subtract(room, d.demand)
            if ok and (best is None or t.price_per_hour < best.price_per_hour):
                best = t
        return best


class Liftoff(Policy):
    """The liftoff controller: stability window, the real planner, waves, immediate release."""

    name = "liftoff"

    def __init__(self, window_s: float, interval_s: float, budget: Budget, node_types: list[NodeType] | None = None):
        self.node_types = node_types or []  # given: act on node-swap advice (the autoscaler follows it)
        if self.node_types:
            self.name = "liftoff+advice"
        self.awaiting: tuple[set[str], float] | None = None
        self.launched = 0
        self.window_s = window_s
        self.interval_s = interval_s
        self.budget = budget
        self.sig: tuple | None = None
        self.changed_at = 0.0
        self.next_plan_at = 0.0
        self.waves: list[list[str]] = []
        self.current: list[str] = []
        self.plans = 0
        self.plan_seconds = 0.0

    def act(self, sim: Sim) -> None:
        if self.current:
            if any(n in sim.nodes for n in self.current):
                return  # wave still migrating
            self.current = []
        budget = self.budget.at(sim.time_of_day())
        if self.waves:
            nxt = self.waves.pop(0)
            moving = sum(len(sim.on_node(n)) for n in nxt if n in sim.nodes)
            warming = budget.protect_warming and any(
                r.state != "running" or sim.t - r.ready_at < sim.deps[r.dep].load_time_s for n in nxt for r in sim.on_node(n)
            )
            within = budget.max_migrations is None or moving <= budget.max_migrations
            if within and not warming and all(n in sim.nodes and not sim.nodes[n].draining for n in nxt):
                self._drain(sim, nxt)
                return
            self.waves = []
        if self.awaiting is not None:
            ids, until = self.awaiting
            if all(n in sim.nodes and sim.ready(sim.nodes[n]) for n in ids) or sim.t > until:
                self.awaiting = None
            else:
                return
        state = sim.cluster_state()
        sig = (
            tuple(sorted(sim.targets.items())),
            tuple(sorted(state.nodes)),
            tuple(sorted(r.replica_id for r in state.replicas)),
        )
        if sig != self.sig:
            self.sig, self.changed_at = sig, sim.t
        if not sim.stable() or sim.t - self.changed_at < self.window_s or sim.t < self.next_plan_at:
            return
        self.next_plan_at = sim.t + self.interval_s
        started = time.perf_counter()
        p = plan(state, budget, time_limit_s=5.0, node_types=self.node_types)
        self.plan_seconds += time.perf_counter() - started
        self.plans += 1
        if p.empty:
            if p.advice:
                self._follow(sim, p.advice[0].launch)
            return
        self.waves = [w.nodes for w in p.waves]
        self._drain(sim, self.waves.pop(0))

    def _follow(self, sim: Sim, launch: dict[str, int]) -> None:
        """The autoscaler follows the advice (live: ray.autoscaler.sdk.request_resources)."""
        types = {t.name: t for t in self.node_types}
        ids = set()
        for name, k in launch.items():
            for _ in range(k):
                ids.add(sim.launch(types[name]).id)
                self.launched += 1
        self.awaiting = (ids, sim.t + max(sim.sc.boot_time(n) for n in launch) + 600.0)

    def _drain(self, sim: Sim, nodes: list[str]) -> None:
        self.current = list(nodes)
        for n in nodes:
            sim.nodes[n].draining = True
            sim.nodes[n].release_when_empty = True
        for n in nodes:
            sim.migrate_off(n)


class Optimum(Policy):
    """Every step, the cheapest repack of all replicas, applied instantly (a floor, not a policy).

    It honours the same placement rule as liftoff (`max_price_ratio`), so it bounds what a perfect
    mechanism could do with liftoff's rules: any replica moves anywhere at once, no budget, no delay.
    """

    name = "optimum"

    def __init__(self, max_price_ratio: float = 0.0) -> None:
        self.ratio = max_price_ratio
        self.sig: tuple | None = None

    def act(self, sim: Sim) -> None:
        state = sim.cluster_state()
        sig = (tuple(sorted(state.nodes)), tuple(sorted((r.deployment, r.node_id) for r in state.replicas)))
        if sig == self.sig:
            return
        _, keep, x = optimum(state, time_limit_s=5.0, max_price_ratio=self.ratio)
        want = dict(x)
        move = []
        for r in sorted(state.replicas, key=lambda r: r.replica_id):
            if want.get((r.deployment, r.node_id), 0) > 0:
                want[(r.deployment, r.node_id)] -= 1
            else:
                move.append(r)
        for r in move:
            dest = next(n for (d, n), k in sorted(want.items()) if d == r.deployment and k > 0)
            want[(r.deployment, dest)] -= 1
            sim.replicas[r.replica_id].node = dest
        for n in list(state.nodes):
            if n not in keep and not state.nodes[n].is_head and not sim.on_node(n):
                sim.nodes.pop(n, None)
        after = sim.cluster_state()
        self.sig = (tuple(sorted(after.nodes)), tuple(sorted((r.deployment, r.node_id) for r in after.replicas)))


# --------------------------------------------------------------------------------------------------
# Running and reporting
# --------------------------------------------------------------------------------------------------


def run_policy(
    sc: Scenario, traces: dict[str, list[float]], policy: Policy, track_bound: bool = False, series: bool = False
) -> dict:
    """One policy over the whole trace. With track_bound, also the per-step integer-program optimum of the
    policy's own cluster (same replicas, same nodes, instant repack), summed into dollars."""
    sim = Sim(sc, traces)
    steps = len(next(iter(traces.values())))
    started = time.perf_counter()
    bound = 0.0
    cache: dict[tuple, float] = {}
    for k in range(steps):
        sim.advance(k, policy)
        if track_bound:
            state = sim.cluster_state()
            key = (tuple(sorted(state.nodes)), tuple(sorted((r.deployment, r.node_id) for r in state.replicas)))
            if key not in cache:
                cache[key] = optimum(state, time_limit_s=5.0, max_price_ratio=sc.budget.max_price_ratio)[0]
            booting = sum(n.type.price_per_hour for n in sim.nodes.values() if not sim.ready(n))
            bound += (cache[key] + booting) * sc.step_s / 3600
    final = sim.cluster_state()
    final_opt, _, _ = optimum(final, max_price_ratio=sc.budget.max_price_ratio)
    immediate = isinstance(policy, Liftoff) or getattr(policy, "release_when_empty", False)
    released = sim.released_by_policy if immediate else getattr(policy, "completed", 0)
    out = {
        "policy": policy.name,
        "dollars": sim.dollars,
        "node_hours": sim.node_seconds / 3600,
        "gpu_hours": sim.gpu_seconds / 3600,
        "migrations": sim.migrations,
        "nodes_released_by_compaction": released,
        "migrations_per_node_released": (sim.migrations / released) if released else 0.0,
        "tokens": sim.tokens,
        "tokens_per_gpu_second": sim.tokens / sim.gpu_seconds if sim.gpu_seconds else 0.0,
        "served_fraction": sim.tokens / sim.demand_tokens if sim.demand_tokens else 1.0,
        "in_time_fraction": sim.in_time_tokens / sim.demand_tokens if sim.demand_tokens else 1.0,
        "max_delay_s": sim.max_delay_s if math.isfinite(sim.max_delay_s) else None,
        "final_cost_per_hour": final.cost_per_hour(),
        "final_optimum_per_hour": final_opt,
        "own_bound_dollars": bound if track_bound else None,
        "nodes_launched_on_advice": getattr(policy, "launched", 0),
        "plans": getattr(policy, "plans", 0),
        "plan_seconds": getattr(policy, "plan_seconds", 0.0),
        "wall_seconds": time.perf_counter() - started,
    }
    if series:
        out["series"] = sim.series
    return out


POLICIES = ("none", "ray", "ray-active", "karpenter", "liftoff", "liftoff+advice", "optimum")


def make_policy(name: str, sc: Scenario) -> Policy:
    """A fresh policy object by its table name."""
    if name == "none":
        return Policy()
    if name == "ray":
        return RayRule()
    if name == "ray-active":
        return RayActive()
    if name == "karpenter":
        return Karpenter(sc.karpenter_budget_fraction, sc.karpenter_consolidate_after_s)
    if name == "liftoff":
        return Liftoff(sc.liftoff_window_s, sc.liftoff_interval_s, sc.budget)
    if name == "liftoff+advice":
        return Liftoff(sc.liftoff_window_s, sc.liftoff_interval_s, sc.budget, sc.node_types)
    if name == "optimum":
        return Optimum(sc.budget.max_price_ratio)
    raise ValueError(f"unknown policy {name!r}: choose from {', '.join(POLICIES)}")


def run_all(sc: Scenario, advice: bool = True, policies: tuple[str, ...] | None = None, series: bool = False) -> dict:
    """Every policy on the same traces (one seed), and the comparisons the targets are stated in."""
    traces = demand_traces(sc)
    names = [p for p in (policies or POLICIES) if advice or p != "liftoff+advice"]
    runs = {}
    for name in names:
        runs[name] = run_policy(sc, traces, make_policy(name, sc), track_bound=name == "liftoff", series=series)
    return {"seed": sc.seed, "runs": runs, "summary": summarize(runs)}


def summarize(runs: dict) -> dict:
    """Savings against `none` and the distances from the optimum, for whichever of them ran."""
    out: dict = {}
    if "none" in runs:
        none = runs["none"]["dollars"]
        out["savings_vs_none"] = {p: none - r["dollars"] for p, r in runs.items()}
    save = out.get("savings_vs_none", {})
    if "liftoff" in runs and "ray" in runs and save:
        # Ray's rule may cost more than doing nothing (it releases nodes only after the idle timeout and
        # stuffs premium GPUs); the ratio is then infinite.
        out["liftoff_over_ray_savings"] = (save["liftoff"] / save["ray"]) if save["ray"] > 0 else math.inf
    if "liftoff" in runs:
        lift = runs["liftoff"]
        bound = lift.get("own_bound_dollars")
        out["liftoff_dollars_over_own_bound"] = lift["dollars"] / bound - 1.0 if bound else 0.0
        if "optimum" in runs:
            opt = runs["optimum"]
            out["liftoff_dollars_over_optimum"] = lift["dollars"] / opt["dollars"] - 1.0
            out["liftoff_final_over_optimum"] = lift["final_cost_per_hour"] / opt["final_cost_per_hour"] - 1.0
    if "optimum" in runs:
        out["dollars_over_optimum"] = {p: r["dollars"] / runs["optimum"]["dollars"] - 1.0 for p, r in runs.items()}
    if "liftoff+advice" in runs and "optimum" in runs:
        out["advice_dollars_over_optimum"] = runs["liftoff+advice"]["dollars"] / runs["optimum"]["dollars"] - 1.0
    return out


def _totals(rows: list[dict]) -> dict:
    released = sum(r["nodes_released_by_compaction"] for r in rows)
    gpu_s = sum(r["gpu_hours"] for r in rows) * 3600
    bound = [r["own_bound_dollars"] for r in rows]
    return {
        "dollars": sum(r["dollars"] for r in rows),
        "node_hours": sum(r["node_hours"] for r in rows),
        "gpu_hours": sum(r["gpu_hours"] for r in rows),
        "migrations": sum(r["migrations"] for r in rows),
        "nodes_released_by_compaction": released,
        "migrations_per_node_released": sum(r["migrations"] for r in rows) / released if released else 0.0,
        "tokens_per_gpu_second": sum(r["tokens"] for r in rows) / gpu_s if gpu_s else 0.0,
        "served_fraction": sum(r["served_fraction"] for r in rows) / len(rows),
        "in_time_fraction": sum(r["in_time_fraction"] for r in rows) / len(rows),
        "own_bound_dollars": sum(bound) if all(b is not None for b in bound) else None,
        "final_cost_per_hour": sum(r["final_cost_per_hour"] for r in rows),
    }


def run_scenario(
    sc: Scenario,
    seeds: list[int] | tuple[int, ...] | None = None,
    advice: bool = True,
    policies: tuple[str, ...] | None = None,
    series: bool = False,
) -> dict:
    """A scenario for several seeds (default: the scenario's own), with totals over all of them."""
    seeds = list(seeds if seeds is not None else sc.seeds)
    per_seed = [run_all(replace(sc, seed=s), advice=advice, policies=policies, series=series) for s in seeds]
    totals: dict[str, dict] = {}
    for name in POLICIES:
        rows = [r["runs"][name] for r in per_seed if name in r["runs"]]
        if rows:
            totals[name] = _totals(rows)
    summary = summarize(totals)
    targets = {}
    if "liftoff" in totals and "ray" in totals and "liftoff_over_ray_savings" in summary:
        targets["liftoff saves >= 1.3x the dollars Ray's rule saves"] = summary["liftoff_over_ray_savings"] >= 1.3
    if "liftoff_dollars_over_optimum" in summary:
        targets["liftoff's dollars within 2% of the optimum's"] = summary["liftoff_dollars_over_optimum"] <= 0.02
    if "liftoff" in totals and totals["liftoff"]["own_bound_dollars"]:
        targets["liftoff's dollars within 2% of the per-step optimum of its own cluster"] = (
            summary["liftoff_dollars_over_own_bound"] <= 0.02
        )
    if "liftoff" in totals and "ray" in totals:
        targets["no more migrations per node released than Ray's rule"] = (
            totals["liftoff"]["migrations_per_node_released"] <= totals["ray"]["migrations_per_node_released"]
        )
    summary["targets"] = targets
    return {
        "scenario": sc.name,
        "hours": sc.hours,
        "step_s": sc.step_s,
        "seeds": seeds,
        "per_seed": per_seed,
        "totals": totals,
        "summary": summary,
    }


def run_seeds(seeds: list[int], hours: float = 48.0, step_s: float = 60.0, advice: bool = True) -> dict:
    """The default scenario for several seeds, with totals over all of them."""
    return run_scenario(default_scenario(hours=hours, step_s=step_s), seeds, advice=advice)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]


def format_results(res: dict) -> str:
    """A table of the totals over all seeds, the per-seed dollars, and the targets."""
    head = (
        "policy",
        "node-h",
        "$",
        "saved $",
        "vs optimum",
        "migrations",
        "released",
        "migr/node",
        "tok/GPU-s",
        "served",
        "in time",
    )
    rows = [head]
    s = res["summary"]
    for name in POLICIES:
        r = res["totals"].get(name)
        if r is None:
            continue
        saved = s.get("savings_vs_none", {}).get(name)
        gap = s.get("dollars_over_optimum", {}).get(name)
        rows.append(
            (
                name,
                f"{r['node_hours']:.0f}",
                f"{r['dollars']:.0f}",
                "-" if saved is None else f"{saved:.0f}",
                "-" if gap is None else f"{100 * gap:+.1f}%",
                str(r["migrations"]),
                str(r["nodes_released_by_compaction"]),
                f"{r['migrations_per_node_released']:.2f}",
                f"{r['tokens_per_gpu_second']:.0f}",
                f"{100 * r['served_fraction']:.1f}%",
                f"{100 * r['in_time_fraction']:.1f}%",
            )
        )
    out = [
        f"scenario {res.get('scenario', 'default')}: {len(res['seeds'])} seed(s) x {res['hours']:g} h, "
        f"{res['step_s']:g} s steps; totals over all seeds"
    ]
    out += _table(rows)
    out.append("")
    out.append(
        "per seed, $: "
        + "; ".join(
            f"seed {r['seed']}: " + ", ".join(f"{n} {r['runs'][n]['dollars']:.0f}" for n in POLICIES if n in r["runs"])
            for r in res["per_seed"]
        )
    )
    if "liftoff_over_ray_savings" in s:
        ratio = s["liftoff_over_ray_savings"]
        said = "money while Ray's rule saves none" if math.isinf(ratio) else f"{ratio:.2f}x the dollars Ray's rule saves"
        out.append(f"liftoff saves {said}")
    if "liftoff_dollars_over_optimum" in s:
        out.append(
            f"liftoff $ vs the optimum run: {100 * s['liftoff_dollars_over_optimum']:+.1f}%; "
            f"vs the per-step optimum of its own cluster: {100 * s['liftoff_dollars_over_own_bound']:+.1f}%"
        )
    if "advice_dollars_over_optimum" in s:
        out.append(
            "liftoff with the autoscaler following its node-swap advice: "
            f"{100 * s['advice_dollars_over_optimum']:+.1f}% vs the optimum run"
        )
    for k, v in s.get("targets", {}).items():
        out.append(f"  {'met   ' if v else 'MISSED'} {k}")
    return "\n".join(out)


def plot_results(res: dict, path: str) -> None:
    """$/h and worker nodes over time per policy (the first seed), as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = res["per_seed"][0]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    for name in POLICIES:
        run = first["runs"].get(name)
        if run is None or "series" not in run:
            continue
        ser = run["series"]
        ax1.plot(ser["t_h"], ser["cost_per_hour"], label=name, linewidth=1)
        ax2.plot(ser["t_h"], ser["nodes"], label=name, linewidth=1)
    ax1.set_ylabel("$/h")
    ax2.set_ylabel("worker nodes")
    ax2.set_xlabel("hours")
    ax1.set_title(f"scenario {res.get('scenario', 'default')}, seed {first['seed']}")
    ax1.legend(loc="upper right", fontsize=8, ncol=2)
    ax1.grid(alpha=0.3)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# What scale-up speed is worth: the headroom each replica load time needs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadTime:
    """A replica load time for every deployment: `seconds`, or `factor` times each deployment's own."""

    name: str
    seconds: float | None = None
    factor: float | None = None

    def apply(self, sc: Scenario) -> Scenario:
        deps = [
            replace(d, load_time_s=self.seconds if self.seconds is not None else d.load_time_s * (self.factor or 1.0))
            for d in sc.deployments
        ]
        return replace(sc, deployments=deps)

    def describe(self) -> str:
        if self.seconds is not None:
            return f"{self.seconds:g} s"
        return f"{self.factor:.3g} x the scenario's"


TARGET_GRID = tuple(round(0.95 - 0.05 * i, 2) for i in range(17))  # 0.95 .. 0.15
EXTRA_GRID = tuple(range(0, 9))


def with_headroom(sc: Scenario, knob: str, value: float) -> Scenario:
    """The scenario with its steady headroom set: a target utilization for every deployment, or extra min replicas."""
    if knob == "target":
        return replace(sc, target_utilization=value, deployments=[replace(d, target_utilization=None) for d in sc.deployments])
    extra = int(value)
    return replace(
        sc,
        deployments=[
            replace(d, min_replicas=d.min_replicas + extra, max_replicas=max(d.max_replicas, d.min_replicas + extra))
            for d in sc.deployments
        ],
    )


def _aggregate(sc: Scenario, seeds: list[int], policy: str) -> dict:
    rows = []
    for s in seeds:
        one = replace(sc, seed=s)
        rows.append(run_policy(one, demand_traces(one), make_policy(policy, one)))
    tot = _totals(rows)
    demand = sum(r["tokens"] / r["served_fraction"] if r["served_fraction"] else 0.0 for r in rows)
    in_time = sum(r["in_time_fraction"] * (r["tokens"] / r["served_fraction"] if r["served_fraction"] else 0.0) for r in rows)
    tot["in_time_fraction"] = in_time / demand if demand else 1.0
    return tot


def headroom(
    sc: Scenario,
    seeds: list[int],
    load_times: list[LoadTime],
    slo: float = 0.99,
    knob: str = "target",
    compare: tuple[str, ...] = ("none", "liftoff"),
) -> dict:
    """For each load time, the least steady headroom that serves `slo` of the demand within sc.max_delay_s.

    The search runs without compaction (`none`) over a grid (target utilization 0.95 down to 0.15, or 0-8
    extra minimum replicas per deployment), by bisection (more headroom never serves less, up to noise);
    then every policy in `compare` runs at that headroom: node-hours, dollars, tokens per GPU-second.
    """
    if knob not in ("target", "min-replicas"):
        raise ValueError(f"unknown headroom knob {knob!r}: target or min-replicas")
    grid: tuple[float, ...] = TARGET_GRID if knob == "target" else EXTRA_GRID
    out: dict = {"slo": slo, "max_delay_s": sc.max_delay_s, "knob": knob, "seeds": seeds, "paths": {}}
    for lt in load_times:
        base = lt.apply(sc)
        cache: dict[int, dict] = {}

        def ok(i: int, base: Scenario = base, cache: dict[int, dict] = cache) -> bool:
            if i not in cache:
                cache[i] = _aggregate(with_headroom(base, knob, grid[i]), seeds, "none")
            return cache[i]["in_time_fraction"] >= slo

        lo, hi = 0, len(grid) - 1
        if not ok(hi):
            found = None
        elif ok(lo):
            found = lo
        else:
            while hi - lo > 1:  # ok(hi) and not ok(lo)
                mid = (lo + hi) // 2
                if ok(mid):
                    hi = mid
                else:
                    lo = mid
            found = hi
        entry: dict = {"load_time": lt.describe(), "headroom": None if found is None else grid[found], "tried": {}}
        entry["tried"] = {str(grid[i]): cache[i]["in_time_fraction"] for i in sorted(cache)}
        if found is not None:
            at = with_headroom(base, knob, grid[found])
            entry["runs"] = {p: (cache[found] if p == "none" else _aggregate(at, seeds, p)) for p in compare}
        out["paths"][lt.name] = entry
    return out


def format_headroom(res: dict) -> str:
    """The headroom comparison as a table."""
    knob = "target utilization" if res["knob"] == "target" else "extra min replicas"
    out = [
        f"headroom to serve {100 * res['slo']:g}% of demand within {res['max_delay_s']:g} s of queueing "
        f"({len(res['seeds'])} seed(s); knob: {knob})"
    ]
    rows = [("path", "load time", knob, "policy", "node-h", "$", "tok/GPU-s", "in time")]
    for name, e in res["paths"].items():
        if e["headroom"] is None:
            rows.append((name, e["load_time"], "not reached", "-", "-", "-", "-", "-"))
            continue
        for p, r in e["runs"].items():
            rows.append(
                (
                    name,
                    e["load_time"],
                    f"{e['headroom']:g}",
                    p,
                    f"{r['node_hours']:.0f}",
                    f"{r['dollars']:.0f}",
                    f"{r['tokens_per_gpu_second']:.0f}",
                    f"{100 * r['in_time_fraction']:.2f}%",
                )
            )
    out += _table(rows)
    return "\n".join(out)
