"""A model of Ray Serve 2.60's built-in compaction rule, for comparison (no Ray import).

What Serve 2.60 does with `RAY_SERVE_USE_PACK_SCHEDULING_STRATEGY=1` (read from
`ray/serve/_private/deployment_scheduler.py`, `DeploymentScheduler._find_best_node_to_compact`,
and `deployment_state.py`, `DeploymentStateManager.update`):

- Only when no node is draining, every deployment is HEALTHY with exactly its target number of
  RUNNING replicas, and that has held for `RAY_SERVE_NODE_COMPACTION_DELAY_S` (300 s); after a scan
  that finds nothing it waits `COMPACTION_SCAN_INTERVAL_S` (10 s); failures back off 2^n seconds.
- One node at a time. For every active non-head node, it best-fit packs that node's replicas, largest
  first (GPU, then CPU, memory, other custom resources), onto the *other non-idle* nodes (never an
  idle node), honouring label selectors (then fallbacks) and `max_replicas_per_node` (through an
  implicit per-node resource of total 1). A node whose replicas all fit is a candidate; nodes with
  gang or non-STRICT_PACK placement-group replicas are skipped.
- Among candidates it takes the largest node by total resources (memory rounded to GiB, object
  store and node:<ip> ignored), ties broken by the fewest migrations. Price plays no part.
- The chosen node is treated as draining by Serve only (replacements start, then the old replicas
  stop); the compaction completes when the node leaves the active set, i.e. when the autoscaler
  releases it after its idle timeout, and is cancelled after `RAY_SERVE_COMPACTION_TIMEOUT_S`.

Where Serve iterates a Python set (node ids, custom resource names, replicas of equal size), the
order is arbitrary in Ray; this model uses sorted order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from serve_integration.compaction.model import EPSILON, IMPLICIT_RESOURCE_PREFIX, ClusterState, Deployment

GIB = 2**30

# Serve 2.60 defaults (ray/serve/_private/constants.py, deployment_scheduler.py).
NODE_COMPACTION_DELAY_S = 300.0
COMPACTION_SCAN_INTERVAL_S = 10.0
COMPACTION_TIMEOUT_S = 1800.0
COMPACTION_MAX_BACKOFF_S = 3600.0


@dataclass
class CompactionStep:
    node: str
    assignment: dict[str, str]  # replica id -> destination node


def _get(res: Mapping[str, float], key: str, available: bool) -> float:
    if key in res:
        return res[key]
    # AvailableNodeResources.get: implicit resources default to their total of 1.
    return 1.0 if available and key.startswith(IMPLICIT_RESOURCE_PREFIX) else 0.0


def _lt(a: Mapping[str, float], b: Mapping[str, float], custom_priority: Sequence[str], available: bool = True) -> bool:
    """Ray's `Resources.__lt__`: priority custom resources, GPU, CPU, memory, then other custom."""
    keys = set(a) | set(b)
    order = [*custom_priority, "GPU", "CPU", "memory", *sorted(keys - {"GPU", "CPU", "memory"} - set(custom_priority))]
    for k in order:
        x, y = _get(a, k, available), _get(b, k, available)
        if x < y:
            return True
        if x > y:
            return False
    return False


def _eq(a: Mapping[str, float], b: Mapping[str, float], available: bool = True) -> bool:
    return all(_get(a, k, available) == _get(b, k, available) for k in set(a) | set(b))


def _can_fit(avail: Mapping[str, float], req: Mapping[str, float]) -> bool:
    return all(_get(avail, k, True) + EPSILON >= _get(req, k, False) for k in set(avail) | set(req))


def _sub(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    return {k: _get(a, k, True) - _get(b, k, False) for k in set(a) | set(b)}


def required_resources(dep: Deployment) -> dict[str, float]:
    """Serve's `DeploymentSchedulingInfo.required_resources`, including the implicit per-node resource."""
    req = dict(dep.demand)
    if dep.max_replicas_per_node and dep.max_replicas_per_node > 0:
        req[f"{IMPLICIT_RESOURCE_PREFIX}{dep.app}:{dep.name}"] = 1.0 / dep.max_replicas_per_node
    return req


def node_size(total: Mapping[str, float]) -> dict[str, float]:
    """Serve's `_compaction_node_size`: drop node labels and the object store, round memory to GiB."""
    size = {k: v for k, v in total.items() if not k.startswith("node:") and k != "object_store_memory"}
    if "memory" in size:
        size["memory"] = round(size["memory"] / GIB) * GIB
    return size


def available_per_node(state: ClusterState) -> dict[str, dict[str, float]]:
    """What Serve's pack scheduler believes is free: capacity minus running and launching replicas."""
    out: dict[str, dict[str, float]] = {}
    for n, node in state.nodes.items():
        if not node.alive or node.draining:
            continue
        avail: dict[str, float] = dict(node.capacity())
        for r in state.replicas_on(n):
            avail = _sub(avail, required_resources(state.deployments[r.deployment]))
        out[n] = avail
    return out


def _best_fit(req: Mapping[str, float], candidates: Mapping[str, dict[str, float]], custom_priority: Sequence[str]) -> str | None:
    chosen, best = None, None
    for n in sorted(candidates):
        if not _can_fit(candidates[n], req):
            continue
        remaining = _sub(candidates[n], req)
        if best is None or _lt(remaining, best, custom_priority):
            chosen, best = n, remaining
    return chosen


def find_node_to_compact(state: ClusterState, custom_priority: Sequence[str] = ()) -> CompactionStep | None:
    """The node Serve 2.60 would compact next in this state, and where its replicas would go."""
    available = available_per_node(state)
    running: dict[str, list[str]] = {n: [] for n in available}
    for r in state.replicas:
        if r.state == "RUNNING" and r.node_id in running:
            running[r.node_id].append(r.replica_id)
    by_id = {r.replica_id: r for r in state.replicas}
    best: tuple[str, dict[str, str]] | None = None
    for target in sorted(available):
        if state.nodes[target].is_head:
            continue
        others = {n: dict(v) for n, v in available.items() if n != target and running[n]}
        on_target = sorted(running[target])
        deps = {rid: state.deployments[by_id[rid].deployment] for rid in on_target}
        # sorted(..., key=required_resources, reverse=True) with Ray's ordering, stable on ties.
        ordered: list[str] = []
        for rid in on_target:
            req = required_resources(deps[rid])
            pos = len(ordered)
            for k, other in enumerate(ordered):
                if _lt(required_resources(deps[other]), req, custom_priority, available=False):
                    pos = k
                    break
            ordered.insert(pos, rid)
        assignment: dict[str, str] = {}
        for rid in ordered:
            dep = deps[rid]
            if not dep.movable:
                assignment.clear()
                break
            req = required_resources(dep)
            selectors = list(dep.label_selectors) or [{}]
            chosen = None
            for sel in selectors:
                cands = {n: v for n, v in others.items() if _matches(state, n, sel)}
                chosen = _best_fit(req, cands, custom_priority)
                if chosen:
                    break
            if not chosen:
                assignment.clear()
                break
            assignment[rid] = chosen
            others[chosen] = _sub(others[chosen], req)
        if not assignment:
            continue
        if best is None:
            take = True
        else:
            cur, prev = node_size(state.nodes[target].total), node_size(state.nodes[best[0]].total)
            greater = not _lt(cur, prev, custom_priority) and not _eq(cur, prev)
            take = greater or (_eq(cur, prev) and len(assignment) < len(best[1]))
        if take:
            best = (target, assignment)
    return CompactionStep(best[0], best[1]) if best else None


def _matches(state: ClusterState, node_id: str, selector: Mapping[str, str]) -> bool:
    from serve_integration.compaction.model import selector_matches

    return not selector or selector_matches(state.nodes[node_id].labels, selector)


def compact_to_fixpoint(
    state: ClusterState, custom_priority: Sequence[str] = (), max_steps: int = 10_000
) -> tuple[ClusterState, list[CompactionStep]]:
    """Apply Serve's rule one node at a time, each emptied node released, until no node qualifies."""
    steps: list[CompactionStep] = []
    current = state
    for _ in range(max_steps):
        step = find_node_to_compact(current, custom_priority)
        if step is None:
            break
        steps.append(step)
        current = current.with_moves(step.assignment).without_nodes([step.node])
    return current, steps
