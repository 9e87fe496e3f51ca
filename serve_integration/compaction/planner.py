"""Which nodes to empty, and where their replicas go, so the kept nodes cost the least per hour.

Pure and deterministic: a `ClusterState` in, a `Plan` out. The exact method is an integer program
(scipy's HiGHS, time-limited); a greedy fallback covers clusters too large for it. Both respect:

- capacity per resource type (GPU, CPU, memory, custom resources such as `accelerator_type:*`),
  after what non-Serve work already holds on each node;
- the deployments' constraints: label selectors (with fallbacks), `max_replicas_per_node`,
  replicas that cannot move (pinned, gang or spread placement groups);
- Ray's mechanism: a drain moves *every* replica off a node, start-then-stop, and nothing else
  moves a replica. So replicas on kept nodes stay put and moved replicas land on kept nodes;
- a disruption budget: nodes draining at once, replicas of one deployment moving at once, and a
  healthy floor per deployment. A node whose replicas would break the budget on their own is
  never chosen; the rest are grouped into waves that each respect it.

Formulation (aggregated by deployment, so identical replicas share one integer variable):

    y_i in {0,1}      node i kept            x_di in Z>=0   replicas of deployment d on node i
    min  (N+1) * sum_i (P_i - L*n_i) y_i  -  sum_i n_i y_i
    s.t. sum_i x_di = R_d                           every replica placed
         x_di >= c_di y_i                           a kept node keeps its replicas
         x_di <= u_di y_i                           removed nodes hold nothing; u = max_replicas_per_node
         sum_d a_dr x_di <= K_ir y_i                capacity per resource r
         y_i = 1 for the head, unremovable, budget-blocked nodes; y_i = 0 for draining nodes

with P_i the price in milli-dollars per hour, n_i the movable replicas on node i, L the optional
migration penalty. The (N+1) factor makes the objective lexicographic: cheapest kept set first,
then the fewest migrations among the cheapest. The LP relaxation gives the lower bound reported
as the plan's gap.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import math
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

from serve_integration.compaction.model import EPSILON, ClusterState, Deployment, Node, add, fits, subtract

log = logging.getLogger(__name__)

MAX_MILP_VARIABLES = 40_000
# Node-swap advice only when it cuts the hourly bill by this fraction: a launch costs its boot time and a
# second migration, and small swaps churn (the simulator's traces: 10% beat 0-5% and 15-25%).
ADVICE_MIN_FRACTION = 0.10


@dataclass(frozen=True)
class BudgetWindow:
    """A daily window ("09:00-18:00", may wrap midnight) with its own disruption limits (None: unchanged)."""

    start_s: float
    end_s: float
    max_migrations: int | None = None
    max_draining_nodes: int | None = None

    def covers(self, seconds_of_day: float) -> bool:
        t = seconds_of_day % 86400.0
        if self.start_s <= self.end_s:
            return self.start_s <= t < self.end_s
        return t >= self.start_s or t < self.end_s

    @classmethod
    def parse(cls, schedule: str, max_migrations: int | None = None, max_draining_nodes: int | None = None) -> BudgetWindow:
        """From "HH:MM-HH:MM"; ValueError naming the problem otherwise."""
        m = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", str(schedule))
        if not m:
            raise ValueError(f'expected "HH:MM-HH:MM", got {schedule!r}')
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        if h1 > 24 or h2 > 24 or m1 > 59 or m2 > 59 or (h1 == 24 and m1) or (h2 == 24 and m2):
            raise ValueError(f"not a time of day in {schedule!r}")
        start, end = h1 * 3600 + m1 * 60, h2 * 3600 + m2 * 60
        if start == end:
            raise ValueError(f"empty window {schedule!r}")
        return cls(float(start), float(end), max_migrations, max_draining_nodes)


def seconds_of_day(epoch_s: float) -> float:
    """Local time of day of a wall-clock time, in seconds (the live controller's clock for budget windows)."""
    t = time.localtime(epoch_s)
    return t.tm_hour * 3600.0 + t.tm_min * 60.0 + t.tm_sec


@dataclass(frozen=True)
class Budget:
    """How much disruption one plan may cause at a time."""

    max_draining_nodes: int = 4
    # Cap on replicas of one deployment in migration at once (None: only the healthy floor limits it).
    max_moving_per_deployment: int | None = None
    # Replicas of a deployment that must stay out of migration: floor(fraction * replicas). A replica
    # in migration keeps serving until its replacement is up (start-then-stop), but it is at risk.
    min_healthy_fraction: float = 0.5
    # Ignore plans that save less than this per hour.
    min_savings_per_hour: float = 0.0
    # Dollars per hour a single migration must earn back (0: any saving is worth it, fewest moves wins ties).
    migration_penalty_per_hour: float = 0.0
    # Placement rule, not a disruption limit: never move a replica onto a node that costs more than this
    # many times per unit (GPU, else CPU) than the cheapest node in the cluster it could run on. Keeps
    # premium GPUs free for the models that can only run there (0 disables).
    max_price_ratio: float = 3.0
    # Migrations one plan may make in all (None: no cap; 0: only empty nodes may go).
    max_migrations: int | None = None
    # Never move a replica that became RUNNING less than its deployment's load time ago.
    protect_warming: bool = True
    # Time-of-day overrides (e.g. no migrations during the daily peak); `at()` applies the one in force.
    windows: tuple[BudgetWindow, ...] = ()

    def at(self, seconds_of_day: float) -> Budget:
        """The budget in force at this time of day: the first window that covers it overrides its fields."""
        for w in self.windows:
            if w.covers(seconds_of_day):
                return replace(
                    self,
                    max_migrations=self.max_migrations if w.max_migrations is None else w.max_migrations,
                    max_draining_nodes=self.max_draining_nodes if w.max_draining_nodes is None else w.max_draining_nodes,
                    windows=(),
                )
        return replace(self, windows=())

    def moving_limit(self, replicas: int) -> int:
        """Replicas of a deployment with `replicas` replicas that may migrate at once."""
        limit = replicas - math.floor(self.min_healthy_fraction * replicas + EPSILON)
        if self.max_moving_per_deployment is not None:
            limit = min(limit, self.max_moving_per_deployment)
        return max(0, limit)


@dataclass(frozen=True)
class NodeType:
    """A node type the autoscaler could launch, for node-swap advice."""

    name: str
    resources: dict[str, float]
    price_per_hour: float
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Move:
    replica_id: str
    deployment: str
    source: str
    target: str  # where the plan found room; Serve's scheduler picks the actual node


@dataclass
class Wave:
    nodes: list[str]
    moves: list[Move]


@dataclass
class Advice:
    """Replace kept nodes with fewer, cheaper ones: for the autoscaler, not executed by liftoff."""

    launch: dict[str, int]
    release: list[str]
    cost_per_hour_after: float
    savings_per_hour: float
    text: str


@dataclass
class Plan:
    fingerprint: str
    keep: list[str]
    remove: list[str]
    waves: list[Wave]
    cost_before: float
    cost_after: float
    migrations: int
    lower_bound: float
    solver: str
    optimal: bool
    solve_time_s: float
    blocked: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    advice: list[Advice] = field(default_factory=list)

    @property
    def savings_per_hour(self) -> float:
        return self.cost_before - self.cost_after

    @property
    def gap(self) -> float:
        """Relative distance of the plan's cost from the LP lower bound."""
        if self.cost_after <= EPSILON:
            return 0.0
        return max(0.0, (self.cost_after - self.lower_bound) / self.cost_after)

    @property
    def empty(self) -> bool:
        return not self.remove

    def to_dict(self) -> dict:
        out = asdict(self)
        out["savings_per_hour"] = self.savings_per_hour
        out["gap"] = self.gap
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> Plan:
        data = dict(data)
        data.pop("savings_per_hour", None)
        data.pop("gap", None)
        data["waves"] = [Wave(nodes=list(w["nodes"]), moves=[Move(**m) for m in w["moves"]]) for w in data["waves"]]
        data["advice"] = [Advice(**a) for a in data.get("advice", [])]
        return cls(**data)


# --------------------------------------------------------------------------------------------------
# The problem, prepared once for every method
# --------------------------------------------------------------------------------------------------


@dataclass
class _Problem:
    state: ClusterState
    budget: Budget
    nodes: list[str]  # sorted, alive
    deps: list[str]  # sorted deployment keys with replicas
    count: dict[tuple[str, str], int]  # (dep, node) -> replicas now
    replicas_of: dict[str, int]  # dep -> replicas now
    movable_on: dict[str, int]  # node -> movable replicas now
    fixed_keep: dict[str, str]  # node -> why it must stay
    fixed_remove: set[str]  # draining nodes: already leaving
    resources: list[str]  # resource names any deployment asks for
    capacity: dict[str, dict[str, float]]  # node -> resource -> room for replicas
    limit: dict[str, int]  # dep -> replicas that may move at once
    target_ok: dict[str, set[str]]  # dep -> nodes that may receive its moved replicas

    def allowed(self, dep: str, node: str) -> bool:
        d = self.state.deployments[dep]
        return d.allows(self.state.nodes[node])

    def per_node_cap(self, dep: str) -> int:
        m = self.state.deployments[dep].max_replicas_per_node
        return m if m and m > 0 else self.replicas_of[dep]


def _prepare(state: ClusterState, budget: Budget) -> _Problem:
    nodes = sorted(n for n, node in state.nodes.items() if node.alive)
    count: dict[tuple[str, str], int] = {}
    replicas_of: dict[str, int] = {}
    for r in state.replicas:
        if r.node_id not in state.nodes or not state.nodes[r.node_id].alive:
            continue
        count[(r.deployment, r.node_id)] = count.get((r.deployment, r.node_id), 0) + 1
        replicas_of[r.deployment] = replicas_of.get(r.deployment, 0) + 1
    deps = sorted(replicas_of)
    missing = [d for d in deps if d not in state.deployments]
    if missing:
        raise ValueError(f"replicas of unknown deployments {missing}: the snapshot is inconsistent, read it again")
    limit = {d: budget.moving_limit(replicas_of[d]) for d in deps}
    fixed_keep: dict[str, str] = {}
    fixed_remove: set[str] = set()
    movable_on: dict[str, int] = {}
    for n in nodes:
        node = state.nodes[n]
        movable_on[n] = sum(c for (d, m), c in count.items() if m == n and state.deployments[d].movable)
        if node.draining:
            fixed_remove.add(n)
            continue
        if node.is_head:
            fixed_keep[n] = "head node"
        elif not node.removable:
            fixed_keep[n] = node.reason or "not removable"
        else:
            for d in deps:
                c = count.get((d, n), 0)
                if not c:
                    continue
                dep = state.deployments[d]
                if not dep.movable:
                    fixed_keep[n] = f"runs {d}, whose replicas cannot move ({dep.reason or 'pinned'})"
                    break
                if c > limit[d]:
                    fixed_keep[n] = f"holds {c} replicas of {d}; the budget lets {limit[d]} of its {replicas_of[d]} move at once"
                    break
            cap = budget.max_migrations
            if n not in fixed_keep and cap is not None and movable_on[n] > cap:
                fixed_keep[n] = f"holds {movable_on[n]} replicas; the budget allows {cap} migration(s) per plan now"
            if n not in fixed_keep and budget.protect_warming:
                warm = next((r for r in state.replicas if r.node_id == n and state.warming(r)), None)
                if warm is not None:
                    dep = state.deployments[warm.deployment]
                    age = state.taken_at - (warm.ready_at or 0.0)
                    fixed_keep[n] = (
                        f"replica {warm.replica_id} of {warm.deployment} is still warming up "
                        f"(ready {age:.0f}s ago, load time {dep.load_time_s:.0f}s)"
                    )
    resources = sorted({k for d in deps for k, v in state.deployments[d].demand.items() if v > 0})
    capacity: dict[str, dict[str, float]] = {}
    for n in nodes:
        cap = state.nodes[n].capacity()
        used = state.used(n)
        # Never call the present placement infeasible: room is at least what is in use now.
        capacity[n] = {r: max(cap.get(r, 0.0), used.get(r, 0.0)) for r in resources}
    target_ok = {d: _targets(state, state.deployments[d], nodes, budget.max_price_ratio) for d in deps}
    return _Problem(
        state,
        budget,
        nodes,
        deps,
        count,
        replicas_of,
        movable_on,
        fixed_keep,
        fixed_remove,
        resources,
        capacity,
        limit,
        target_ok,
    )


def unit_price(node: Node, dep: Deployment) -> float | None:
    """Price per unit of the deployment's main resource (GPU, else CPU) on a node; None if it has none."""
    unit = "GPU" if dep.demand.get("GPU", 0.0) > 0 else "CPU" if dep.demand.get("CPU", 0.0) > 0 else None
    if unit is None:
        return node.price_per_hour
    have = node.total.get(unit, 0.0)
    return node.price_per_hour / have if have > 0 else None


def _targets(state: ClusterState, dep: Deployment, nodes: list[str], ratio: float) -> set[str]:
    ok = {n for n in nodes if not state.nodes[n].draining and dep.allows(state.nodes[n])}
    if ratio <= 0:
        return ok
    prices = {n: unit_price(state.nodes[n], dep) for n in ok}
    known = [p for p in prices.values() if p is not None and p > 0]
    if not known:
        return ok
    cap = min(known) * ratio + EPSILON
    return {n for n in ok if prices[n] is None or prices[n] <= cap}


# --------------------------------------------------------------------------------------------------
# Integer program
# --------------------------------------------------------------------------------------------------


def _milli(price: float) -> int:
    return round(price * 1000)


@dataclass
class _Solution:
    keep: set[str]
    x: dict[tuple[str, str], int]
    optimal: bool
    solver: str


_STDOUT_LOCK = threading.Lock()
_SOLVER_LINE = re.compile(rb"^\s*Highs\w*::")  # HiGHS's printf diagnostics: "HighsMipSolverData::..."


@contextmanager
def _solver_stdout_silenced() -> Iterator[None]:
    """Keep HiGHS's C-level diagnostics out of our stdout.

    `disp=False` turns HiGHS's own log off, but some of its MIP code prints with printf regardless.
    While the solver runs, file descriptor 1 goes to a temp file; afterwards the solver's lines are
    logged at debug level and anything else written there (another thread's output) is passed on.
    """
    with _STDOUT_LOCK:
        try:
            saved = os.dup(1)
        except OSError:  # no stdout at all: nothing to protect
            yield
            return
        with tempfile.TemporaryFile() as capture:
            if sys.stdout is not None:
                sys.stdout.flush()
            os.dup2(capture.fileno(), 1)
            try:
                yield
            finally:
                ctypes.CDLL(None).fflush(None)  # printf's buffer goes to the capture, not to the real stdout later
                if sys.stdout is not None:
                    sys.stdout.flush()
                os.dup2(saved, 1)
                os.close(saved)
                capture.seek(0)
                for line in capture:
                    if _SOLVER_LINE.match(line):
                        log.debug("HiGHS: %s", line.decode(errors="replace").rstrip())
                    else:
                        _write_all(1, line)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _milp(
    prob: _Problem, time_limit_s: float, relax: bool = False, extra: Sequence[NodeType] = (), free_repack: bool = False
) -> tuple[_Solution | None, float]:
    """Solve the program (or its LP relaxation); returns the solution and, for the LP, its cost bound.

    `extra` adds up to as many new nodes of each type as there are removable nodes (advice mode).
    `free_repack` drops Ray's mechanism (any replica may move anywhere) and the budget: the bound.
    """
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_array

    state = prob.state
    slots: list[tuple[str, Node]] = [(n, state.nodes[n]) for n in prob.nodes]
    new_slots = 0
    if extra:
        per_type = max(1, min(4, sum(1 for n in prob.nodes if n not in prob.fixed_keep)))
        for t in extra:
            for k in range(per_type):
                slot_id = f"new:{t.name}:{k}"
                slots.append((slot_id, Node(slot_id, t.price_per_hour, dict(t.resources), labels=dict(t.labels))))
                new_slots += 1
    n_slots = len(slots)
    index = {s: i for i, (s, _) in enumerate(slots)}
    total_replicas = sum(prob.replicas_of.values())
    big = total_replicas + 1
    lam = _milli(prob.budget.migration_penalty_per_hour)

    xkeys: list[tuple[str, str]] = []
    for d in prob.deps:
        for s, node in slots:
            if node.draining:
                continue
            if state.deployments[d].allows(node) or prob.count.get((d, s), 0):
                xkeys.append((d, s))
    xidx = {k: n_slots + j for j, k in enumerate(xkeys)}
    nvar = n_slots + len(xkeys)

    c = np.zeros(nvar)
    hard_keep = {n for n in prob.nodes if state.nodes[n].is_head or not state.nodes[n].removable}
    hard_keep |= {n for (d, n), k in prob.count.items() if k and not state.deployments[d].movable}
    fixed_keep = hard_keep if free_repack else set(prob.fixed_keep)
    for i, (s, node) in enumerate(slots):
        moved = prob.movable_on.get(s, 0)
        if relax or free_repack:
            c[i] = node.price_per_hour
        else:
            c[i] = big * (_milli(node.price_per_hour) - lam * moved) - moved
    lb = np.zeros(nvar)
    ub = np.ones(nvar)
    for s, i in index.items():
        if s in fixed_keep:
            lb[i] = 1
        if s in prob.fixed_remove:
            ub[i] = 0
    for (d, s), j in xidx.items():
        dep = state.deployments[d]
        now = prob.count.get((d, s), 0)
        if not dep.movable:
            lb[j] = ub[j] = now
        else:
            ub[j] = min(prob.per_node_cap(d), prob.replicas_of[d])
            rule = not free_repack or prob.budget.max_price_ratio > 0
            if rule and s in prob.nodes and s not in prob.target_ok.get(d, set()):
                ub[j] = min(ub[j], now)  # may keep what it has, never receive more
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    clo: list[float] = []
    chi: list[float] = []

    def row(entries: Iterable[tuple[int, float]], lo: float, hi: float) -> None:
        r = len(clo)
        for col, val in entries:
            rows.append(r)
            cols.append(col)
            vals.append(val)
        clo.append(lo)
        chi.append(hi)

    for d in prob.deps:
        row(((xidx[(d, s)], 1.0) for s, _ in slots if (d, s) in xidx), prob.replicas_of[d], prob.replicas_of[d])
    for (d, s), j in xidx.items():
        now = prob.count.get((d, s), 0)
        i = index[s]
        if now and state.deployments[d].movable and not free_repack:
            row([(j, 1.0), (i, -float(now))], 0.0, np.inf)
        row([(j, 1.0), (i, -float(ub[j]))], -np.inf, 0.0)
    for s, node in slots:
        i = index[s]
        cap = prob.capacity.get(s) or {r: node.capacity().get(r, 0.0) for r in prob.resources}
        for r in prob.resources:
            entries = [(xidx[(d, s)], state.deployments[d].demand.get(r, 0.0)) for d in prob.deps if (d, s) in xidx]
            entries = [(j, v) for j, v in entries if v > 0]
            if entries:
                row([*entries, (i, -cap.get(r, 0.0))], -np.inf, EPSILON)
    cap_moves = prob.budget.max_migrations
    if cap_moves is not None and not free_repack:
        # sum of movable replicas on removed nodes <= cap  <=>  sum n_i y_i >= total - cap
        free_nodes = [n for n in prob.nodes if n not in prob.fixed_keep and n not in prob.fixed_remove and prob.movable_on[n]]
        total_movable = sum(prob.movable_on[n] for n in free_nodes)
        if free_nodes and total_movable > cap_moves:
            row([(index[n], float(prob.movable_on[n])) for n in free_nodes], float(total_movable - cap_moves), np.inf)
    if extra:  # symmetry: use new slots of one type in order
        for t in extra:
            ids = [index[s] for s, _ in slots if s.startswith(f"new:{t.name}:")]
            for a, b in itertools.pairwise(ids):
                row([(a, 1.0), (b, -1.0)], 0.0, np.inf)
    constraints = []
    if clo:
        a = coo_array((vals, (rows, cols)), shape=(len(clo), nvar)).tocsr()
        constraints.append(LinearConstraint(a, np.array(clo), np.array(chi)))
    integrality = np.zeros(nvar) if relax else np.ones(nvar)
    options = {"time_limit": max(0.1, time_limit_s), "disp": False, "presolve": True}
    if not relax:
        options["mip_rel_gap"] = 0.0
    with _solver_stdout_silenced():
        res = milp(c, integrality=integrality, bounds=Bounds(lb, ub), constraints=constraints, options=options)
    if res.x is None:
        return None, 0.0
    if relax:
        return None, float(res.fun)
    xs = np.round(res.x).astype(int)
    keep = {s for s, i in index.items() if xs[i] == 1}
    x = {k: int(xs[j]) for k, j in xidx.items() if xs[j] > 0}
    return _Solution(keep, x, bool(res.status == 0), "milp"), 0.0


def optimum(
    state: ClusterState, time_limit_s: float = 10.0, max_price_ratio: float = 0.0
) -> tuple[float, set[str], dict[tuple[str, str], int]]:
    """The cheapest node set that could host every replica if any replica could move anywhere at once.

    A lower bound for any compaction (no start-then-stop, no budget): the simulator's "optimum".
    With `max_price_ratio`, it honours the same placement rule as `plan` (no replica moves onto a
    premium node). Returns its cost per hour, the nodes kept, and (deployment, node) -> replicas.
    """
    prob = _prepare(state, Budget(min_healthy_fraction=0.0, max_price_ratio=max_price_ratio))
    if not prob.nodes:
        return 0.0, set(), {}
    sol, _ = _milp(prob, time_limit_s, free_repack=True)
    if sol is None:
        return state.cost_per_hour(), set(prob.nodes), dict(prob.count)
    return sum(state.nodes[n].price_per_hour for n in sol.keep), sol.keep, sol.x


# --------------------------------------------------------------------------------------------------
# Greedy fallback
# --------------------------------------------------------------------------------------------------


def _place(
    prob: _Problem,
    items: list[str],
    targets: list[str],
    free: dict[str, dict[str, float]],
    counts: dict[tuple[str, str], int],
) -> dict[int, str] | None:
    """Best-fit decreasing placement of replicas (deployment keys) onto target nodes; None if one does not fit.

    `free` and `counts` are updated in place only on success.
    """
    state = prob.state
    order = sorted(range(len(items)), key=lambda k: _size_key(state.deployments[items[k]].demand), reverse=True)
    trial_free = {n: dict(free[n]) for n in targets}
    trial_counts = dict(counts)
    out: dict[int, str] = {}
    for k in order:
        d = items[k]
        dep = state.deployments[d]
        best: tuple | None = None
        for n in targets:
            if n not in prob.target_ok.get(d, ()) or not fits(trial_free[n], dep.demand):
                continue
            if trial_counts.get((d, n), 0) + 1 > prob.per_node_cap(d):
                continue
            left = subtract(trial_free[n], dep.demand)
            key = (_size_key(left), n)
            if best is None or key < best[0]:
                best = (key, n)
        if best is None:
            return None
        n = best[1]
        out[k] = n
        trial_free[n] = subtract(trial_free[n], dep.demand)
        trial_counts[(d, n)] = trial_counts.get((d, n), 0) + 1
    free.update(trial_free)
    counts.clear()
    counts.update(trial_counts)
    return out


def _size_key(res: Mapping[str, float]) -> tuple:
    """Order resources the way Serve's pack scheduler does: GPU, then CPU, memory, then the rest."""
    rest = sorted(k for k in res if k not in ("GPU", "CPU", "memory"))
    return (res.get("GPU", 0.0), res.get("CPU", 0.0), res.get("memory", 0.0), *(res.get(k, 0.0) for k in rest))


def _greedy_once(prob: _Problem, order: list[str]) -> _Solution:
    state = prob.state
    free = {n: subtract(prob.capacity[n], state.used(n)) for n in prob.nodes}
    counts = dict(prob.count)
    removed: set[str] = set(prob.fixed_remove)
    received: set[str] = set()
    # Draining nodes' replicas go first: they are leaving regardless.
    for n in sorted(prob.fixed_remove):
        items = [r.deployment for r in state.replicas_on(n)]
        for d in items:
            counts[(d, n)] -= 1
        targets = [m for m in prob.nodes if m not in removed]
        placed = _place(prob, items, targets, free, counts)
        if placed is None:
            raise _Infeasible(f"the replicas of draining node {n[:12]} do not fit on the other nodes")
        received.update(placed.values())
    moved = 0
    cap_moves = prob.budget.max_migrations
    for n in order:
        if n in removed or n in prob.fixed_keep or n in received:
            continue
        if cap_moves is not None and moved + prob.movable_on[n] > cap_moves:
            continue
        items = [r.deployment for r in state.replicas_on(n)]
        targets = [m for m in prob.nodes if m not in removed and m != n]
        trial_counts = dict(counts)
        for d in items:
            trial_counts[(d, n)] -= 1
        placed = _place(prob, items, targets, free, trial_counts)
        if placed is None:
            continue
        counts.clear()
        counts.update(trial_counts)
        removed.add(n)
        moved += prob.movable_on[n]
        received.update(placed.values())
    keep = {n for n in prob.nodes if n not in removed}
    x = {k: v for k, v in counts.items() if v > 0 and k[1] in keep}
    return _Solution(keep, x, False, "greedy")


class _Infeasible(Exception):
    pass


def _score(prob: _Problem, sol: _Solution) -> tuple[float, int]:
    cost = sum(prob.state.nodes[n].price_per_hour for n in sol.keep)
    moves = sum(prob.movable_on.get(n, 0) for n in prob.nodes if n not in sol.keep and n not in prob.fixed_remove)
    return round(cost + prob.budget.migration_penalty_per_hour * moves, 6), moves


def _greedy(prob: _Problem) -> _Solution:
    state = prob.state
    removable = [n for n in prob.nodes if n not in prob.fixed_keep and n not in prob.fixed_remove]

    def price(n: str) -> float:
        return state.nodes[n].price_per_hour

    def per_unit(n: str) -> float:
        cap = state.nodes[n].capacity()
        unit = cap.get("GPU") or cap.get("CPU") or 1.0
        return price(n) / max(unit, EPSILON)

    orders = [
        sorted(removable, key=lambda n: (-price(n), prob.movable_on[n], n)),
        sorted(removable, key=lambda n: (-per_unit(n), prob.movable_on[n], n)),
        sorted(removable, key=lambda n: (prob.movable_on[n], -price(n), n)),
        sorted(removable, key=lambda n: (-price(n) / (1 + prob.movable_on[n]), n)),
    ]
    best: _Solution | None = None
    for order in orders:
        sol = _greedy_once(prob, order)
        if best is None or _score(prob, sol) < _score(prob, best):
            best = sol
    ray = _ray_rule_solution(prob)
    if ray is not None and _score(prob, ray) < _score(prob, best):
        best = ray
    assert best is not None
    return best


def _ray_rule_solution(prob: _Problem) -> _Solution | None:
    """Ray's own rule as a candidate, so the fallback is never worse than it (when it fits the budget)."""
    from serve_integration.compaction.raypolicy import compact_to_fixpoint

    if prob.fixed_remove:
        return None
    final, steps = compact_to_fixpoint(prob.state)
    removed = {s.node for s in steps}
    if any(n in prob.fixed_keep for n in removed):
        return None
    if prob.budget.max_migrations is not None and sum(prob.movable_on[n] for n in removed) > prob.budget.max_migrations:
        return None
    # A replica moved twice by Ray's rule is one move in ours (it goes straight to its last node).
    keep = {n for n in prob.nodes if n not in removed}
    # Ray's rule never empties idle nodes (the autoscaler does): ours does.
    for n in list(keep):
        if n not in prob.fixed_keep and not final.replicas_on(n):
            keep.discard(n)
    x: dict[tuple[str, str], int] = {}
    for r in final.replicas:
        x[(r.deployment, r.node_id)] = x.get((r.deployment, r.node_id), 0) + 1
    for (d, n), k in x.items():
        if k > prob.count.get((d, n), 0) and n not in prob.target_ok.get(d, set()):
            return None  # Ray's rule put it somewhere our placement rule forbids
    return _Solution(keep, x, False, "greedy")


# --------------------------------------------------------------------------------------------------
# From a solution to a plan: moves, waves, checks
# --------------------------------------------------------------------------------------------------


def _moves(prob: _Problem, sol: _Solution) -> list[Move]:
    state = prob.state
    slots: dict[str, list[str]] = {}
    for d in prob.deps:
        for n in sorted(sol.keep):
            extra = sol.x.get((d, n), 0) - prob.count.get((d, n), 0)
            slots.setdefault(d, []).extend([n] * max(0, extra))
    moves: list[Move] = []
    for r in sorted(state.replicas, key=lambda r: (r.node_id, r.deployment, r.replica_id)):
        if r.node_id in sol.keep or r.node_id not in state.nodes:
            continue
        free_slots = slots.get(r.deployment) or []
        if not free_slots:
            raise _Infeasible(f"no room planned for replica {r.replica_id} of {r.deployment}")
        moves.append(Move(r.replica_id, r.deployment, r.node_id, free_slots.pop(0)))
    return moves


def _waves(prob: _Problem, remove: list[str], moves: list[Move]) -> list[Wave]:
    """Group nodes into waves: at most max_draining_nodes each, per-deployment moves within the budget."""
    state = prob.state
    by_node: dict[str, list[Move]] = {n: [] for n in remove}
    for m in moves:
        by_node[m.source].append(m)
    idle = [n for n in remove if not by_node[n]]
    busy = sorted((n for n in remove if by_node[n]), key=lambda n: (-state.nodes[n].price_per_hour, -len(by_node[n]), n))
    waves: list[tuple[list[str], dict[str, int]]] = []
    cap = max(1, prob.budget.max_draining_nodes)
    for n in idle:
        if waves and len(waves[-1][0]) < cap and not waves[-1][1]:
            waves[-1][0].append(n)
        else:
            waves.append(([n], {}))
    for n in busy:
        need: dict[str, int] = {}
        for m in by_node[n]:
            need[m.deployment] = need.get(m.deployment, 0) + 1
        for nodes, moving in waves:
            if len(nodes) >= cap:
                continue
            if all(moving.get(d, 0) + k <= prob.limit[d] for d, k in need.items()):
                nodes.append(n)
                for d, k in need.items():
                    moving[d] = moving.get(d, 0) + k
                break
        else:
            waves.append(([n], dict(need)))
    return [Wave(nodes=nodes, moves=[m for n in nodes for m in by_node[n]]) for nodes, _ in waves]


def validate(state: ClusterState, plan: Plan, budget: Budget) -> list[str]:
    """Everything wrong with a plan against a snapshot (empty list: valid). Used by tests and the executor."""
    errors: list[str] = []
    prob = _prepare(state, budget)
    keep = set(plan.keep)
    for n in plan.remove:
        if n not in state.nodes:
            errors.append(f"node {n[:12]} is not in the cluster")
        elif n in prob.fixed_keep:
            errors.append(f"node {n[:12]} must stay: {prob.fixed_keep[n]}")
    if keep & set(plan.remove):
        errors.append("a node is both kept and removed")
    moved = {m.replica_id: m for w in plan.waves for m in w.moves}
    final_nodes: dict[str, str] = {}
    for r in state.replicas:
        if r.node_id in plan.remove:
            if r.replica_id not in moved:
                errors.append(f"replica {r.replica_id} on removed node {r.node_id[:12]} has no move")
                continue
            final_nodes[r.replica_id] = moved[r.replica_id].target
        else:
            if r.replica_id in moved:
                errors.append(f"replica {r.replica_id} moves off kept node {r.node_id[:12]}")
            final_nodes[r.replica_id] = r.node_id
    used: dict[str, dict[str, float]] = {}
    counts: dict[tuple[str, str], int] = {}
    for r in state.replicas:
        n = final_nodes.get(r.replica_id)
        if n is None:
            continue
        if n in plan.remove:
            errors.append(f"replica {r.replica_id} is moved onto removed node {n[:12]}")
        dep = state.deployments[r.deployment]
        if n in state.nodes and not dep.allows(state.nodes[n]) and r.node_id != n:
            errors.append(f"replica {r.replica_id} of {dep.key} is moved to {n[:12]}, which its label selector excludes")
        elif n in state.nodes and r.node_id != n and n not in prob.target_ok.get(dep.key, set()):
            errors.append(f"replica {r.replica_id} of {dep.key} is moved to {n[:12]}, above max_price_ratio")
        used[n] = add(used.get(n, {}), dep.demand)
        counts[(dep.key, n)] = counts.get((dep.key, n), 0) + 1
    for n, u in used.items():
        if n not in state.nodes:
            continue
        cap = prob.capacity.get(n, {})
        for res, v in u.items():
            if v > cap.get(res, 0.0) + 1e-6:
                errors.append(f"node {n[:12]} is over capacity in {res}: {v:g} > {cap.get(res, 0.0):g}")
    for (d, n), k in counts.items():
        m = state.deployments[d].max_replicas_per_node
        if m and k > m and prob.count.get((d, n), 0) < k:
            errors.append(f"node {n[:12]} holds {k} replicas of {d}, above max_replicas_per_node={m}")
    if budget.max_migrations is not None and len(moved) > budget.max_migrations:
        errors.append(f"the plan makes {len(moved)} migrations, budget {budget.max_migrations}")
    for m in moved.values():
        r = next((x for x in state.replicas if x.replica_id == m.replica_id), None)
        if budget.protect_warming and r is not None and state.warming(r):
            errors.append(f"replica {r.replica_id} of {r.deployment} is moved while still warming up")
    for i, w in enumerate(plan.waves):
        if len(w.nodes) > max(1, budget.max_draining_nodes):
            errors.append(f"wave {i} drains {len(w.nodes)} nodes, budget {budget.max_draining_nodes}")
        per: dict[str, int] = {}
        for m in w.moves:
            per[m.deployment] = per.get(m.deployment, 0) + 1
        for d, k in per.items():
            if k > prob.limit.get(d, 0):
                errors.append(f"wave {i} moves {k} replicas of {d}, budget {prob.limit.get(d, 0)}")
    return errors


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def empty_plan(state: ClusterState, reason: str, solver: str = "none") -> Plan:
    cost = state.cost_per_hour()
    alive = sorted(n for n, node in state.nodes.items() if node.alive)
    return Plan(state.fingerprint(), alive, [], [], cost, cost, 0, cost, solver, True, 0.0, notes=[reason])


def plan(
    state: ClusterState,
    budget: Budget | None = None,
    *,
    method: str = "auto",
    time_limit_s: float = 10.0,
    node_types: Sequence[NodeType] = (),
    min_graceful_shutdown_s: float = 0.0,
    advice_min_fraction: float = ADVICE_MIN_FRACTION,
) -> Plan:
    """Plan a compaction of `state` (see the module docstring for the program it solves).

    method: "milp" (exact, time-limited), "greedy", or "auto" (the program unless it is too large,
    then greedy; a time-limited program is never returned if the greedy plan is better).
    """
    budget = budget or Budget()
    if method not in ("auto", "milp", "greedy"):
        raise ValueError(f"unknown planning method {method!r}: use auto, milp or greedy")
    started = time.perf_counter()
    prob = _prepare(state, budget)
    cost_before = state.cost_per_hour()
    if not prob.nodes:
        return empty_plan(state, "the cluster has no nodes")
    n_vars = len(prob.nodes) * (1 + len(prob.deps))
    use_milp = method == "milp" or (method == "auto" and n_vars <= MAX_MILP_VARIABLES)
    notes: list[str] = []
    sol: _Solution | None = None
    lower = 0.0
    try:
        if use_milp:
            sol, _ = _milp(prob, time_limit_s)
            if sol is None:
                notes.append(f"the integer program found no solution within {time_limit_s:g}s; used the greedy plan")
            elif not sol.optimal:
                notes.append(f"the integer program hit its {time_limit_s:g}s limit; the plan may not be optimal")
        if sol is None or (not sol.optimal and method != "milp"):
            greedy = _greedy(prob)
            if sol is None or _score(prob, greedy) < _score(prob, sol):
                sol = greedy
        _, lower = _milp(prob, max(1.0, time_limit_s / 4), relax=True)
    except _Infeasible as e:
        return empty_plan(state, f"no feasible placement: {e}")
    assert sol is not None
    remove = sorted(n for n in prob.nodes if n not in sol.keep and n not in prob.fixed_remove)
    cost_after = sum(state.nodes[n].price_per_hour for n in sol.keep)
    blocked = {n: why for n, why in prob.fixed_keep.items() if not state.nodes[n].is_head}
    if cost_before - cost_after < max(budget.min_savings_per_hour, EPSILON) and not prob.fixed_remove:
        out = empty_plan(state, "no plan saves money: every node is needed, or blocked", sol.solver)
        out.blocked, out.lower_bound, out.optimal = blocked, min(lower, cost_before), sol.optimal
        out.solve_time_s = time.perf_counter() - started
        if cost_before - cost_after > EPSILON:
            out.notes = [
                f"the best plan saves ${cost_before - cost_after:.2f}/h, under the ${budget.min_savings_per_hour:.2f}/h minimum"
            ]
        out.advice = _advice(prob, node_types, cost_before, time_limit_s, advice_min_fraction)
        return out
    try:
        moves = _moves(prob, sol)
    except _Infeasible as e:
        return empty_plan(state, f"internal: {e}")
    moves = [m for m in moves if m.source not in prob.fixed_remove]
    waves = _waves(prob, remove, moves)
    for d in sorted({m.deployment for m in moves}):
        dep = state.deployments[d]
        if dep.graceful_shutdown_timeout_s < min_graceful_shutdown_s:
            notes.append(
                f"{d}: graceful_shutdown_timeout_s={dep.graceful_shutdown_timeout_s:g}s cuts in-flight requests longer than that "
                f"when a replica stops; raise it (>= {min_graceful_shutdown_s:g}s) for long LLM streams"
            )
    result = Plan(
        fingerprint=state.fingerprint(),
        keep=sorted(sol.keep),
        remove=remove,
        waves=waves,
        cost_before=cost_before,
        cost_after=cost_after,
        migrations=len(moves),
        lower_bound=min(lower, cost_after),
        solver=sol.solver,
        optimal=sol.optimal,
        solve_time_s=0.0,
        blocked=blocked,
        notes=notes,
    )
    result.advice = _advice(prob, node_types, cost_after, time_limit_s, advice_min_fraction)
    result.solve_time_s = time.perf_counter() - started
    return result


def _advice(
    prob: _Problem, node_types: Sequence[NodeType], cost_now: float, time_limit_s: float, min_fraction: float
) -> list[Advice]:
    """If launching cheaper node types would let more nodes go, say so (never executed here)."""
    if not node_types:
        return []
    n_vars = (len(prob.nodes) + 4 * len(node_types)) * (1 + len(prob.deps))
    if n_vars > MAX_MILP_VARIABLES:
        return []
    sol, _ = _milp(prob, time_limit_s, extra=node_types)
    if sol is None:
        return []
    launch: dict[str, int] = {}
    for s in sol.keep:
        if s.startswith("new:"):
            name = s.split(":")[1]
            launch[name] = launch.get(name, 0) + 1
    if not launch:
        return []
    prices = {t.name: t.price_per_hour for t in node_types}
    after = sum(prob.state.nodes[n].price_per_hour for n in sol.keep if not n.startswith("new:"))
    after += sum(prices[t] * k for t, k in launch.items())
    if cost_now - after < max(0.01, min_fraction * cost_now):
        return []
    release = sorted(n for n in prob.nodes if n not in sol.keep)
    what = ", ".join(f"{k} x {t} (${prices[t]:.2f}/h each)" for t, k in sorted(launch.items()))
    text = (
        f"launch {what}, then drain {len(release)} node(s): ${cost_now:.2f}/h -> ${after:.2f}/h (saves ${cost_now - after:.2f}/h)"
    )
    return [Advice(launch=launch, release=release, cost_per_hour_after=after, savings_per_hour=cost_now - after, text=text)]
