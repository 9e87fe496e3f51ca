"""The model of Ray Serve 2.60's compaction rule, by hand and against Ray's own scheduler code."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from serve_integration.compaction.model import ClusterState
from serve_integration.compaction.raypolicy import compact_to_fixpoint, find_node_to_compact, node_size, required_resources
from tests.compaction.builders import dep, node, state
from tests.compaction.test_planner_props import clusters


def test_largest_node_first_whatever_it_costs():
    st = state(
        [node("head", 0, 0, head=True), node("cheap4", 4, 1.0), node("dear2", 2, 9.0), node("other", 2, 1.0)],
        [dep("a/A", 1, 3)],
        {"cheap4": ["a/A"], "dear2": ["a/A"], "other": ["a/A"]},
    )
    step = find_node_to_compact(st)
    assert step is not None and step.node == "cheap4"  # the 4-GPU node, though it is the cheapest per GPU
    assert set(step.assignment.values()) <= {"dear2", "other"}


def test_ties_go_to_fewest_migrations_and_never_to_idle_nodes():
    st = state(
        [node("head", 0, 0, head=True), node("a", 4, 1), node("b", 4, 1), node("idle", 8, 1)],
        [dep("x/X", 1, 3)],
        {"a": ["x/X"], "b": ["x/X", "x/X"]},
    )
    step = find_node_to_compact(st)
    assert step is not None and step.node == "a"  # b would need two migrations
    assert list(step.assignment.values()) == ["b"]  # never the empty 8-GPU node
    tight = state(
        [node("head", 0, 0, head=True), node("a", 2, 1), node("b", 2, 1), node("idle", 8, 1)],
        [dep("x/X", 1, 3)],
        {"a": ["x/X"], "b": ["x/X", "x/X"]},
    )
    assert find_node_to_compact(tight) is None  # the only room is on an idle node


def test_head_skipped_and_nothing_fits():
    st = state([node("head", 2, 0, head=True), node("w", 2, 5)], [dep("x/X", 2, 2)], {"head": ["x/X"], "w": ["x/X"]})
    assert find_node_to_compact(st) is None


def test_max_replicas_per_node_uses_the_implicit_resource():
    d = dep("x/X", 1, 2, max_replicas_per_node=1)
    assert required_resources(d)["node:__internal_implicit_resource_x:X"] == 1.0
    st = state([node("head", 0, 0, head=True), node("a", 4, 1), node("b", 4, 1)], [d], {"a": ["x/X"], "b": ["x/X"]})
    assert find_node_to_compact(st) is None


def test_fixpoint_moves_one_node_at_a_time():
    st = state(
        [node("head", 0, 0, head=True)] + [node(f"w{i}", 4, 1) for i in range(4)],
        [dep("x/X", 1, 4)],
        {f"w{i}": ["x/X"] for i in range(4)},
    )
    final, steps = compact_to_fixpoint(st)
    assert len(steps) == 3 and len(final.occupied_nodes()) == 1


def test_node_size_ignores_bookkeeping_and_rounds_memory():
    a = node_size({"GPU": 2, "memory": 16.2 * 2**30, "object_store_memory": 5, "node:10.0.0.1": 1})
    assert a == {"GPU": 2, "memory": 16 * 2**30}


# --- against Ray's DeploymentScheduler -------------------------------------------------------------


def _ray_choice(st: ClusterState) -> str | None:
    """Ray 2.60's own `_find_best_node_to_compact`, fed the same cluster."""
    from ray.serve._private.cluster_node_info_cache import ClusterNodeInfoCache
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve._private.config import ReplicaConfig
    from ray.serve._private.deployment_scheduler import DeploymentScheduler, SpreadDeploymentSchedulingPolicy

    class Cache(ClusterNodeInfoCache):
        def __init__(self) -> None:
            alive = sorted(st.nodes)
            self._cached_alive_nodes = [(n, "127.0.0.1", "") for n in alive]
            self._cached_node_labels = {n: dict(st.nodes[n].labels) for n in alive}
            self._cached_total_resources_per_node = {n: dict(st.nodes[n].total) for n in alive}
            self._cached_available_resources_per_node = {n: st.free(n) for n in alive}
            self._cached_draining_nodes = {}
            self._alive_node_id_set = frozenset(alive)

        def update(self) -> None:
            pass

        def get_node_az(self, node_id: str) -> None:
            return None

    class Model:
        pass

    sched = DeploymentScheduler(Cache(), "head", lambda *a, **k: None)
    ids = {}
    for d in st.deployments.values():
        did = DeploymentID(name=d.name, app_name=d.app)
        ids[d.key] = did
        sched.on_deployment_created(did, SpreadDeploymentSchedulingPolicy())
        opts = {"num_cpus": 0, "num_gpus": d.demand.get("GPU", 0.0)}
        if d.label_selectors:
            opts["label_selector"] = dict(d.label_selectors[0])
        config = ReplicaConfig.create(Model, ray_actor_options=opts, max_replicas_per_node=d.max_replicas_per_node)
        sched.on_deployment_deployed(did, config)
    for r in st.replicas:
        sched.on_replica_running(ReplicaID(r.replica_id, ids[r.deployment]), r.node_id)
    return sched._find_best_node_to_compact()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(clusters(max_workers=4, max_replicas=6))
def test_model_agrees_with_rays_scheduler(st):
    # Ray's scheduler does not know foreign work: give the model the same view.
    st = ClusterState(
        {k: type(v)(**{**v.__dict__, "foreign": {}, "removable": True, "reason": ""}) for k, v in st.nodes.items()},
        st.deployments,
        st.replicas,
    )
    ours = find_node_to_compact(st)
    theirs = _ray_choice(st)
    if theirs is None or ours is None:
        assert theirs is None and ours is None, (theirs, ours)
        return
    # Ray iterates a set, so among equally large nodes with equally many migrations either may win.
    size = lambda n: tuple(sorted(node_size(st.nodes[n].total).items()))  # noqa: E731
    assert size(ours.node) == size(theirs)
    ray_moves = sum(1 for r in st.replicas if r.node_id == theirs)
    assert len(ours.assignment) == ray_moves
