"""The cluster as the compaction planner sees it: nodes, Serve deployments and their replicas.

Pure data (no Ray import): the live reader (`cluster.py`), the planner, the model of Ray's own
rule, the simulator and the tests all speak these types. Everything round-trips through JSON so
an in-flight plan and the snapshot it was made from can be persisted and compared after a restart.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

# Ray's implicit per-node resource (total 1 on every node) that Serve uses for max_replicas_per_node.
IMPLICIT_RESOURCE_PREFIX = "node:__internal_implicit_resource_"
EPSILON = 1e-9

Resources = Mapping[str, float]


def capacity_resources(total: Mapping[str, float]) -> dict[str, float]:
    """A node's schedulable resources without per-node bookkeeping keys (node:<ip>, object store)."""
    return {k: float(v) for k, v in total.items() if not k.startswith("node:") and k != "object_store_memory"}


def demand_resources(demand: Mapping[str, float]) -> dict[str, float]:
    """A replica's demand without Ray's implicit max_replicas_per_node resource and zero entries."""
    return {k: float(v) for k, v in demand.items() if not k.startswith(IMPLICIT_RESOURCE_PREFIX) and v}


def fits(free: Mapping[str, float], demand: Mapping[str, float]) -> bool:
    """True if `demand` fits in `free` (every resource, with Ray's epsilon)."""
    return all(free.get(k, 0.0) + EPSILON >= v for k, v in demand.items() if v > 0)


def subtract(a: Mapping[str, float], b: Mapping[str, float], times: float = 1.0) -> dict[str, float]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0.0) - v * times
    return out


def add(a: Mapping[str, float], b: Mapping[str, float], times: float = 1.0) -> dict[str, float]:
    return subtract(a, b, -times)


def _label_values(expr: str) -> list[str]:
    inner = expr[expr.index("(") + 1 : expr.rindex(")")]
    return [v.strip() for v in inner.split(",") if v.strip()]


def selector_matches(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    """Ray's label selector semantics: `v`, `!v`, `in(a,b)`, `!in(a,b)`; every key must match.

    A negative expression matches a node that lacks the label (as Ray's C++ matcher does).
    """
    for key, raw in selector.items():
        expr = str(raw).strip()
        value = labels.get(key)
        if expr.startswith("!in(") and expr.endswith(")"):
            if value is not None and value in _label_values(expr):
                return False
        elif expr.startswith("in(") and expr.endswith(")"):
            if value is None or value not in _label_values(expr):
                return False
        elif expr.startswith("!"):
            if value is not None and value == expr[1:]:
                return False
        elif value != expr:
            return False
    return True


@dataclass(frozen=True)
class Node:
    """One Ray node: capacity, price, and whether compaction may empty it."""

    node_id: str
    price_per_hour: float
    total: dict[str, float]
    # Resources held by anything that is not a Serve replica we know about (tasks, other actors,
    # placement-group reservations): they stay where they are, so a kept node has less room and a
    # node with any of it cannot be drained without killing someone else's work.
    foreign: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    is_head: bool = False
    draining: bool = False
    alive: bool = True
    removable: bool = True
    reason: str = ""  # why the node is not removable
    node_type: str = ""
    address: str = ""

    def capacity(self) -> dict[str, float]:
        """What replicas may use on this node: total minus foreign usage."""
        return {k: v - self.foreign.get(k, 0.0) for k, v in self.total.items()}

    def can_remove(self) -> bool:
        return self.removable and not self.is_head and self.alive and not self.draining


@dataclass(frozen=True)
class Deployment:
    """One Serve deployment and the constraints on where its replicas may run."""

    app: str
    name: str
    demand: dict[str, float]
    target_replicas: int
    min_replicas: int = 0
    max_replicas_per_node: int | None = None
    # Alternatives, tried in order (the primary label_selector, then fallback_strategy entries);
    # empty means any node.
    label_selectors: tuple[dict[str, str], ...] = ()
    movable: bool = True
    reason: str = ""  # why its replicas cannot be moved
    healthy: bool = True
    status: str = "HEALTHY"
    message: str = ""  # Serve's status message (why it is unhealthy)
    graceful_shutdown_timeout_s: float = 20.0
    # How long a replica takes to load: one that became RUNNING less than this long ago is still warming up
    # (caches, compiled kernels) and compaction leaves it where it is (0: never treated as warming).
    load_time_s: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.app}/{self.name}"

    def allows(self, node: Node) -> bool:
        """True if the deployment's label selectors admit the node."""
        if not self.label_selectors:
            return True
        return any(selector_matches(node.labels, sel) for sel in self.label_selectors)


@dataclass(frozen=True)
class Replica:
    replica_id: str
    deployment: str  # Deployment.key
    node_id: str
    state: str = "RUNNING"
    ready_at: float | None = None  # when it became RUNNING (the snapshot's clock); None: long ago / unknown


@dataclass
class ClusterState:
    """A snapshot: nodes by id, deployments by key, and the replicas placed on the nodes."""

    nodes: dict[str, Node]
    deployments: dict[str, Deployment]
    replicas: list[Replica]
    taken_at: float = 0.0
    # Serve's scheduler mode ("spread" by default, "pack" with RAY_SERVE_USE_PACK_SCHEDULING_STRATEGY=1).
    scheduling: str = "spread"

    # --- views ---------------------------------------------------------------------------------
    def replicas_on(self, node_id: str) -> list[Replica]:
        return [r for r in self.replicas if r.node_id == node_id]

    def counts(self) -> dict[tuple[str, str], int]:
        """(deployment key, node id) -> number of replicas."""
        out: dict[tuple[str, str], int] = {}
        for r in self.replicas:
            out[(r.deployment, r.node_id)] = out.get((r.deployment, r.node_id), 0) + 1
        return out

    def used(self, node_id: str) -> dict[str, float]:
        """Resources the Serve replicas on a node use."""
        used: dict[str, float] = {}
        for r in self.replicas_on(node_id):
            used = add(used, self.deployments[r.deployment].demand)
        return used

    def free(self, node_id: str) -> dict[str, float]:
        """Room left on a node for more replicas."""
        return subtract(self.nodes[node_id].capacity(), self.used(node_id))

    def cost_per_hour(self, node_ids: Iterable[str] | None = None) -> float:
        ids = self.nodes if node_ids is None else node_ids
        return sum(self.nodes[n].price_per_hour for n in ids if self.nodes[n].alive)

    def occupied_nodes(self) -> set[str]:
        return {r.node_id for r in self.replicas}

    def stable(self) -> tuple[bool, str]:
        """Whether the cluster is settled enough to plan: everything RUNNING, healthy, at target, nothing draining."""
        for d in self.deployments.values():
            if not d.healthy:
                return False, f"deployment {d.key} is {d.status}"
            running = sum(1 for r in self.replicas if r.deployment == d.key and r.state == "RUNNING")
            if running != d.target_replicas:
                return False, f"deployment {d.key} has {running} running replicas, target {d.target_replicas}"
        for r in self.replicas:
            if r.state != "RUNNING":
                return False, f"replica {r.replica_id} is {r.state}"
        for n in self.nodes.values():
            if n.draining:
                return False, f"node {n.node_id[:12]} is draining"
        return True, ""

    def warming(self, replica: Replica) -> bool:
        """True if the replica became RUNNING less than its deployment's load time ago (`ready_at` known)."""
        dep = self.deployments.get(replica.deployment)
        if dep is None or replica.ready_at is None or dep.load_time_s <= 0:
            return False
        return self.taken_at - replica.ready_at < dep.load_time_s

    def fingerprint(self) -> str:
        """Identifies the placement (which replicas on which nodes): a plan is only valid for the state it was made from."""
        items = sorted((r.deployment, r.replica_id, r.node_id) for r in self.replicas)
        nodes = sorted(n for n, node in self.nodes.items() if node.alive)
        return hashlib.sha256(json.dumps([items, nodes]).encode()).hexdigest()[:16]

    # --- editing (used by the simulator and the model of Ray's rule) ---------------------------
    def without_nodes(self, node_ids: Iterable[str]) -> ClusterState:
        gone = set(node_ids)
        return ClusterState(
            nodes={k: v for k, v in self.nodes.items() if k not in gone},
            deployments=dict(self.deployments),
            replicas=[r for r in self.replicas if r.node_id not in gone],
            taken_at=self.taken_at,
            scheduling=self.scheduling,
        )

    def with_moves(self, moves: Mapping[str, str]) -> ClusterState:
        """Replicas (by id) moved to new nodes."""
        return ClusterState(
            nodes=dict(self.nodes),
            deployments=dict(self.deployments),
            replicas=[
                Replica(r.replica_id, r.deployment, moves.get(r.replica_id, r.node_id), r.state, r.ready_at)
                for r in self.replicas
            ],
            taken_at=self.taken_at,
            scheduling=self.scheduling,
        )

    # --- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "taken_at": self.taken_at,
            "scheduling": self.scheduling,
            "nodes": [asdict(n) for n in self.nodes.values()],
            "deployments": [{**asdict(d), "label_selectors": list(d.label_selectors)} for d in self.deployments.values()],
            "replicas": [asdict(r) for r in self.replicas],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> ClusterState:
        nodes = {n["node_id"]: Node(**n) for n in data["nodes"]}
        deps = {}
        for d in data["deployments"]:
            dep = Deployment(**{**d, "label_selectors": tuple(d.get("label_selectors") or ())})
            deps[dep.key] = dep
        return cls(
            nodes=nodes,
            deployments=deps,
            replicas=[Replica(**r) for r in data["replicas"]],
            taken_at=float(data.get("taken_at", 0.0)),
            scheduling=data.get("scheduling", "spread"),
        )
