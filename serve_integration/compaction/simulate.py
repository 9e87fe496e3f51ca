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
from dataclasses import dataclass, field

from serve_integration.compaction.model import ClusterState, Deployment, Node, Replica, selector_matches
from serve_integration.compaction.planner import Budget, NodeType, optimum, plan
from serve_integration.compaction.raypolicy import COMPACTION_TIMEOUT_S, NODE_COMPACTION_DELAY_S, find_node_to_compact


@dataclass
class SimDeployment:
    name: str
    gpus: int
    tokens_per_s: float  # one replica at full load
    pattern: str  # diurnal | bursty | decaying | flat
    peak_tps: float
    base_tps: float
    min_replicas: int = 1
    max_replicas: int = 64
    phase_h: float = 0.0  # diurnal: hour of the peak
    start_h: float = 0.0  # decaying: launch time
    half_life_h: float = 6.0
    load_time_s: float = 120.0
    selector: dict[str, str] | None = None


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


# --------------------------------------------------------------------------------------------------
# The cluster model
# --------------------------------------------------------------------------------------------------


@dataclass
class SNode:
    id: str
    type: NodeType
    ready_at: float
    is_head: bool = False
    draining: bool = False  # no new replicas (liftoff drain or Ray's compaction target)
    release_when_empty: bool = False  # liftoff: a drained raylet exits at once
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
        self.migrations = 0
        self.released_by_policy = 0
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

    # --- views ---------------------------------------------------------------------------------
    def ready(self, n: SNode) -> bool:
        return n.ready_at <= self.t

    def on_node(self, node_id: str) -> list[SReplica]:
        return [r for r in self.replicas.values() if r.node == node_id]

    def free_gpus(self, node_id: str) -> float:
        n = self.nodes[node_id]
        used = sum(self.deps[r.dep].gpus for r in self.on_node(node_id))
        return n.type.resources.get("GPU", 0.0) - used

    def matches(self, dep: str, node: SNode) -> bool:
        sel = self.deps[dep].selector
        return not sel or selector_matches(node.type.labels, sel)

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
                {"GPU": float(d.gpus)},
                self.targets[d.name],
                d.min_replicas,
                label_selectors=(d.selector,) if d.selector else (),
            )
            deps[dep.key] = dep
        reps = [
            Replica(r.id, f"sim/{r.dep}", r.node, "RUNNING" if r.state == "running" else "STARTING")
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
            desired = max(d.min_replicas, min(d.max_replicas, math.ceil(demand / (d.tokens_per_s * sc.target_utilization))))
            cur = self.targets[name]
            if desired > cur:
                self.below_since[name] = None
                self.above_since[name] = self.above_since[name] if self.above_since[name] is not None else self.t
                if self.t - self.above_since[name] >= sc.upscale_delay_s:
                    self.targets[name] = desired
                    self.above_since[name] = None
            elif desired < cur:
                self.above_since[name] = None
                self.below_since[name] = self.below_since[name] if self.below_since[name] is not None else self.t
                if self.t - self.below_since[name] >= sc.downscale_delay_s:
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
        gpus = self.deps[r.dep].gpus
        return [
            n.id
            for n in self.nodes.values()
            if self.ready(n) and not n.draining and not n.is_head and self.matches(r.dep, n) and self.free_gpus(n.id) >= gpus
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
        best = min(pool, key=lambda n: (self.free_gpus(n) - gpus, n))
        r.node, r.state, r.ready_at = best, "loading", self.t + self.deps[r.dep].load_time_s
        self.nodes[best].idle_since = None
        return True

    def _launch(self) -> None:
        """The cluster autoscaler: pending replicas that booting nodes will not take get new nodes."""
        pending = sorted((r for r in self.replicas.values() if r.state == "pending"), key=lambda r: -self.deps[r.dep].gpus)
        if not pending:
            return
        booting = {n.id: n.type.resources.get("GPU", 0.0) for n in self.nodes.values() if not self.ready(n)}
        waiting: list[SReplica] = []
        for r in pending:
            gpus = self.deps[r.dep].gpus
            slot = next((b for b in sorted(booting) if booting[b] >= gpus and self.matches(r.dep, self.nodes[b])), None)
            if slot is None:
                waiting.append(r)
            else:
                booting[slot] -= gpus
        while waiting:
            first = waiting[0]
            best = None
            for t in self.sc.node_types:
                if not self.matches(first.dep, SNode("x", t, 0)) or t.resources.get("GPU", 0) < self.deps[first.dep].gpus:
                    continue
                room, used, took = t.resources.get("GPU", 0.0), 0.0, []
                for r in waiting:
                    g = self.deps[r.dep].gpus
                    if g <= room - used and self.matches(r.dep, SNode("x", t, 0)):
                        used += g
                        took.append(r)
                key = (-used / t.resources["GPU"], t.price_per_hour)
                if best is None or key < best[0]:
                    best = (key, t, took)
            if best is None:
                raise ValueError(f"no node type can host {first.dep}: fix the scenario")
            _, t, took = best
            nid = self._id("n")
            self.nodes[nid] = SNode(nid, t, self.t + self.sc.boot_s)
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
        for n in self.nodes.values():
            self.dollars += n.type.price_per_hour * dt / 3600
            self.node_seconds += dt if not n.is_head else 0.0
            self.gpu_seconds += n.type.resources.get("GPU", 0.0) * dt
        for name, d in self.deps.items():
            running = sum(1 for r in self.replicas.values() if r.dep == name and r.state == "running")
            demand = self.traces[name][k]
            self.demand_tokens += demand * dt
            self.tokens += min(demand, running * d.tokens_per_s) * dt

    # --- migrations (both compaction policies) -------------------------------------------------
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
        sim.migrate_off(step.node, step.assignment)


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
        if self.waves:
            nxt = self.waves.pop(0)
            if all(n in sim.nodes and not sim.nodes[n].draining for n in nxt):
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
        p = plan(state, self.budget, time_limit_s=5.0, node_types=self.node_types)
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
                nid = sim._id("n")
                sim.nodes[nid] = SNode(nid, types[name], sim.t + sim.sc.boot_s)
                ids.add(nid)
                self.launched += 1
        self.awaiting = (ids, sim.t + sim.sc.boot_s + 600.0)

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


def run_policy(sc: Scenario, traces: dict[str, list[float]], policy: Policy, track_bound: bool = False) -> dict:
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
    released = sim.released_by_policy if isinstance(policy, Liftoff) else getattr(policy, "completed", 0)
    return {
        "policy": policy.name,
        "dollars": sim.dollars,
        "node_hours": sim.node_seconds / 3600,
        "gpu_hours": sim.gpu_seconds / 3600,
        "migrations": sim.migrations,
        "nodes_released_by_compaction": released,
        "migrations_per_node_released": (sim.migrations / released) if released else 0.0,
        "tokens_per_gpu_second": sim.tokens / sim.gpu_seconds if sim.gpu_seconds else 0.0,
        "served_fraction": sim.tokens / sim.demand_tokens if sim.demand_tokens else 1.0,
        "final_cost_per_hour": final.cost_per_hour(),
        "final_optimum_per_hour": final_opt,
        "own_bound_dollars": bound if track_bound else None,
        "nodes_launched_on_advice": getattr(policy, "launched", 0),
        "plans": getattr(policy, "plans", 0),
        "plan_seconds": getattr(policy, "plan_seconds", 0.0),
        "wall_seconds": time.perf_counter() - started,
    }


POLICIES = ("none", "ray", "liftoff", "liftoff+advice", "optimum")


def run_all(sc: Scenario, advice: bool = True) -> dict:
    """Every policy on the same traces (one seed), and the comparisons the targets are stated in."""
    traces = demand_traces(sc)
    policies: list[Policy] = [Policy(), RayRule(), Liftoff(sc.liftoff_window_s, sc.liftoff_interval_s, sc.budget)]
    if advice:
        policies.append(Liftoff(sc.liftoff_window_s, sc.liftoff_interval_s, sc.budget, sc.node_types))
    policies.append(Optimum(sc.budget.max_price_ratio))
    runs = {p.name: run_policy(sc, traces, p, track_bound=p.name == "liftoff") for p in policies}
    return {"seed": sc.seed, "runs": runs, "summary": summarize(runs)}


def summarize(runs: dict) -> dict:
    none = runs["none"]["dollars"]
    save = {p: none - r["dollars"] for p, r in runs.items()}
    lift, opt = runs["liftoff"], runs["optimum"]
    out = {
        "savings_vs_none": save,
        # Ray's rule may cost more than doing nothing (it releases nodes only after the idle timeout and
        # stuffs premium GPUs); the ratio is then infinite.
        "liftoff_over_ray_savings": (save["liftoff"] / save["ray"]) if save["ray"] > 0 else math.inf,
        "liftoff_dollars_over_optimum": lift["dollars"] / opt["dollars"] - 1.0,
        "liftoff_dollars_over_own_bound": lift["dollars"] / lift["own_bound_dollars"] - 1.0 if lift["own_bound_dollars"] else 0.0,
        "liftoff_final_over_optimum": lift["final_cost_per_hour"] / opt["final_cost_per_hour"] - 1.0,
    }
    if "liftoff+advice" in runs:
        out["advice_dollars_over_optimum"] = runs["liftoff+advice"]["dollars"] / opt["dollars"] - 1.0
    return out


def run_seeds(seeds: list[int], hours: float = 48.0, step_s: float = 60.0, advice: bool = True) -> dict:
    """The default scenario for several seeds, with totals over all of them."""
    per_seed = [run_all(default_scenario(hours=hours, step_s=step_s, seed=s), advice=advice) for s in seeds]
    totals: dict[str, dict] = {}
    for name in POLICIES:
        rows = [r["runs"][name] for r in per_seed if name in r["runs"]]
        if not rows:
            continue
        released = sum(r["nodes_released_by_compaction"] for r in rows)
        gpu_s = sum(r["gpu_hours"] for r in rows) * 3600
        totals[name] = {
            "dollars": sum(r["dollars"] for r in rows),
            "node_hours": sum(r["node_hours"] for r in rows),
            "migrations": sum(r["migrations"] for r in rows),
            "nodes_released_by_compaction": released,
            "migrations_per_node_released": sum(r["migrations"] for r in rows) / released if released else 0.0,
            "tokens_per_gpu_second": sum(r["tokens_per_gpu_second"] * r["gpu_hours"] * 3600 for r in rows) / gpu_s,
            "served_fraction": sum(r["served_fraction"] for r in rows) / len(rows),
            "own_bound_dollars": sum(r["own_bound_dollars"] for r in rows) if rows[0]["own_bound_dollars"] is not None else None,
            "final_cost_per_hour": sum(r["final_cost_per_hour"] for r in rows),
        }
    summary = summarize(totals)
    lift, ray_ = totals["liftoff"], totals["ray"]
    summary["targets"] = {
        "liftoff saves >= 1.3x the dollars Ray's rule saves": summary["liftoff_over_ray_savings"] >= 1.3,
        "liftoff's dollars within 2% of the optimum's": summary["liftoff_dollars_over_optimum"] <= 0.02,
        "liftoff's dollars within 2% of the per-step optimum of its own cluster": summary["liftoff_dollars_over_own_bound"]
        <= 0.02,
        "no more migrations per node released than Ray's rule": lift["migrations_per_node_released"]
        <= ray_["migrations_per_node_released"],
    }
    return {"hours": hours, "step_s": step_s, "seeds": seeds, "per_seed": per_seed, "totals": totals, "summary": summary}


def format_results(res: dict) -> str:
    """A table of the totals over all seeds, the per-seed dollars, and the targets."""
    head = ("policy", "node-h", "$", "saved $", "migrations", "released", "migr/node", "tok/GPU-s", "served")
    rows = [head]
    s = res["summary"]
    for name in POLICIES:
        r = res["totals"].get(name)
        if r is None:
            continue
        rows.append(
            (
                name,
                f"{r['node_hours']:.0f}",
                f"{r['dollars']:.0f}",
                f"{s['savings_vs_none'][name]:.0f}",
                str(r["migrations"]),
                str(r["nodes_released_by_compaction"]),
                f"{r['migrations_per_node_released']:.2f}",
                f"{r['tokens_per_gpu_second']:.0f}",
                f"{100 * r['served_fraction']:.1f}%",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = [f"{len(res['seeds'])} seed(s) x {res['hours']:g} h, {res['step_s']:g} s steps; totals over all seeds"]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    out.append("")
    out.append(
        "per seed, $: "
        + "; ".join(
            f"seed {r['seed']}: " + ", ".join(f"{n} {r['runs'][n]['dollars']:.0f}" for n in POLICIES if n in r["runs"])
            for r in res["per_seed"]
        )
    )
    ratio = s["liftoff_over_ray_savings"]
    said = "money while Ray's rule saves none" if math.isinf(ratio) else f"{ratio:.2f}x the dollars Ray's rule saves"
    out.append(f"liftoff saves {said}")
    out.append(
        f"liftoff $ vs the optimum run: {100 * s['liftoff_dollars_over_optimum']:+.1f}%; "
        f"vs the per-step optimum of its own cluster: {100 * s['liftoff_dollars_over_own_bound']:+.1f}%"
    )
    if "advice_dollars_over_optimum" in s:
        out.append(
            "liftoff with the autoscaler following its node-swap advice: "
            f"{100 * s['advice_dollars_over_optimum']:+.1f}% vs the optimum run"
        )
    for k, v in s["targets"].items():
        out.append(f"  {'met   ' if v else 'MISSED'} {k}")
    return "\n".join(out)
