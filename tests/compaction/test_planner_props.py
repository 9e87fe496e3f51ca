"""Properties of plans on random small clusters, checked against a brute-force optimum and Ray's rule."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve_integration.compaction.model import ClusterState, Deployment, Node, Replica, fits, subtract
from serve_integration.compaction.planner import Budget, _prepare, plan, validate
from serve_integration.compaction.raypolicy import compact_to_fixpoint

PRICES = [0.8, 1.0, 2.0, 3.5, 5.0, 8.0, 13.0]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@st.composite
def clusters(draw, max_workers: int = 5, max_replicas: int = 8) -> ClusterState:
    """A head plus 2..max_workers GPU nodes, 1..3 deployments, replicas placed where they fit."""
    n = draw(st.integers(2, max_workers))
    nodes = {"head": Node("head", 0.5, {"CPU": 4.0}, is_head=True)}
    for i in range(n):
        gpus = draw(st.sampled_from([1.0, 2.0, 4.0, 8.0]))
        pool = draw(st.sampled_from(["a", "b"]))
        blocked = draw(st.integers(0, 9)) == 0
        nodes[f"n{i}"] = Node(
            f"n{i}",
            draw(st.sampled_from(PRICES)),
            {"GPU": gpus, "CPU": 8.0},
            labels={"pool": pool},
            foreign={"GPU": 1.0} if blocked and gpus > 1 else {},
            removable=not blocked,
            reason="foreign work" if blocked else "",
        )
    deps = {}
    for k in range(draw(st.integers(1, 3))):
        sel = draw(st.sampled_from([(), ({"pool": "a"},), ({"pool": "!b"},)]))
        d = Deployment(
            f"app{k}",
            "d",
            {"GPU": draw(st.sampled_from([1.0, 2.0, 4.0]))},
            0,
            max_replicas_per_node=draw(st.sampled_from([None, None, 1, 2])),
            label_selectors=sel,
        )
        deps[d.key] = d
    replicas: list[Replica] = []
    free = {k: v.capacity() for k, v in nodes.items()}
    count: dict[tuple[str, str], int] = {}
    for _ in range(draw(st.integers(1, max_replicas))):
        d = deps[draw(st.sampled_from(sorted(deps)))]
        options = [
            k
            for k, v in sorted(nodes.items())
            if not v.is_head
            and d.allows(v)
            and fits(free[k], d.demand)
            and count.get((d.key, k), 0) < (d.max_replicas_per_node or 99)
        ]
        if not options:
            continue
        where = draw(st.sampled_from(options))
        free[where] = subtract(free[where], d.demand)
        count[(d.key, where)] = count.get((d.key, where), 0) + 1
        replicas.append(Replica(f"r{len(replicas)}", d.key, where))
    targets = {}
    for r in replicas:
        targets[r.deployment] = targets.get(r.deployment, 0) + 1
    deps = {k: Deployment(**{**d.__dict__, "target_replicas": targets.get(k, 0)}) for k, d in deps.items() if targets.get(k)}
    return ClusterState(nodes, deps, replicas)


def brute_force(state: ClusterState, budget: Budget) -> tuple[float, int]:
    """(cheapest cost + penalty, fewest migrations at that cost) over every set of nodes to empty."""
    prob = _prepare(state, budget)
    removable = [n for n in prob.nodes if n not in prob.fixed_keep]
    best: tuple[float, int] | None = None
    for k in range(len(removable) + 1):
        for gone in itertools.combinations(removable, k):
            keep = [n for n in prob.nodes if n not in gone]
            items = [r for r in state.replicas if r.node_id in gone]
            free = {n: subtract(prob.capacity[n], state.used(n)) for n in keep}
            counts = {key: v for key, v in prob.count.items() if key[1] in keep}
            if _exact_fit(prob, items, keep, free, counts):
                cost = round(sum(state.nodes[n].price_per_hour for n in keep) + budget.migration_penalty_per_hour * len(items), 6)
                cand = (cost, len(items))
                best = cand if best is None or cand < best else best
    assert best is not None
    return best


def _exact_fit(prob, items, keep, free, counts) -> bool:
    if not items:
        return True
    r, rest = items[0], items[1:]
    d = prob.state.deployments[r.deployment]
    for n in keep:
        if n not in prob.target_ok[r.deployment] or not fits(free[n], d.demand):
            continue
        if counts.get((d.key, n), 0) + 1 > prob.per_node_cap(d.key):
            continue
        free[n] = subtract(free[n], d.demand)
        counts[(d.key, n)] = counts.get((d.key, n), 0) + 1
        ok = _exact_fit(prob, rest, keep, free, counts)
        free[n] = subtract(free[n], d.demand, -1)
        counts[(d.key, n)] -= 1
        if ok:
            return True
    return False


def ray_rule_cost(state: ClusterState) -> float:
    """What Ray's rule leaves running once the autoscaler has also released the idle nodes."""
    final, _ = compact_to_fixpoint(state)
    # Serve does not know about non-Serve work: it may empty such a node, but the autoscaler keeps it.
    kept = {n for n, node in state.nodes.items() if node.is_head or not node.removable} | final.occupied_nodes()
    return state.cost_per_hour(kept)


budgets = st.builds(
    Budget,
    max_draining_nodes=st.integers(1, 4),
    max_moving_per_deployment=st.sampled_from([None, 1, 2]),
    min_healthy_fraction=st.sampled_from([0.0, 0.5]),
    migration_penalty_per_hour=st.sampled_from([0.0, 0.0, 0.3]),
    max_price_ratio=st.sampled_from([0.0, 3.0]),
)


@SETTINGS
@given(clusters(), budgets)
def test_plans_respect_capacity_constraints_and_budgets(state, budget):
    for method in ("milp", "greedy"):
        p = plan(state, budget, method=method)
        assert validate(state, p, budget) == [], method
        assert p.cost_after <= p.cost_before + 1e-9
        assert p.lower_bound <= p.cost_after + 1e-6
        assert all(not state.nodes[n].is_head for n in p.remove)


@SETTINGS
@given(clusters(), budgets)
def test_integer_program_matches_brute_force(state, budget):
    p = plan(state, budget, method="milp")
    cost, moves = brute_force(state, budget)
    got = round(p.cost_after + budget.migration_penalty_per_hour * p.migrations, 6)
    assert got == cost and p.migrations == moves, (p.remove, p.cost_after, p.migrations, cost, moves)


@SETTINGS
@given(clusters())
def test_never_worse_than_rays_rule(state):
    """With no budget or placement rule in the way, both methods beat or tie Ray's price-blind rule."""
    free = Budget(max_draining_nodes=100, min_healthy_fraction=0.0, max_price_ratio=0.0)
    ray_cost = ray_rule_cost(state)
    for method in ("milp", "greedy"):
        assert plan(state, free, method=method).cost_after <= ray_cost + 1e-9, method
