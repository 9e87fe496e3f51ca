"""Building cluster snapshots for the pure tests (the same types the live reader produces)."""

from __future__ import annotations

from serve_integration.compaction.model import ClusterState, Deployment, Node, Replica


def node(node_id: str, gpus: float, price: float, *, head: bool = False, labels: dict | None = None, **kw) -> Node:
    total = {"CPU": 8.0, **({"GPU": float(gpus)} if gpus else {})}
    return Node(node_id, price, total, labels=dict(labels or {}), is_head=head, **kw)


def dep(key: str, gpus: float, replicas: int, **kw) -> Deployment:
    app, name = key.split("/")
    return Deployment(app, name, {"GPU": float(gpus)} if gpus else {"CPU": 1.0}, replicas, **kw)


def state(nodes: list[Node], deps: list[Deployment], placement: dict[str, list[str]]) -> ClusterState:
    """placement: node id -> deployment keys of its replicas (ids are generated)."""
    replicas = []
    for n, keys in placement.items():
        for k in keys:
            replicas.append(Replica(f"r{len(replicas)}-{k.split('/')[1]}", k, n))
    return ClusterState({n.node_id: n for n in nodes}, {d.key: d for d in deps}, replicas)


def toy() -> ClusterState:
    """Two expensive 2-GPU nodes holding what two cheap 4-GPU nodes could hold."""
    return state(
        [node("head", 0, 0.5, head=True), node("e1", 2, 8), node("e2", 2, 8), node("l1", 4, 2), node("l2", 4, 2)],
        [dep("a/A", 1, 2, max_replicas_per_node=1), dep("b/B", 1, 1), dep("c/C", 2, 1)],
        {"e1": ["a/A", "b/B"], "e2": ["a/A"], "l1": ["c/C"]},
    )
