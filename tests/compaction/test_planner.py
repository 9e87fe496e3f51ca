"""The planner on hand-built clusters: what it keeps, what it drains, and why it refuses."""

from __future__ import annotations

import json

import pytest

from serve_integration.compaction.model import ClusterState, selector_matches
from serve_integration.compaction.planner import Budget, NodeType, Plan, optimum, plan, validate
from serve_integration.compaction.raypolicy import compact_to_fixpoint
from tests.compaction.builders import dep, node, state, toy

FREE = Budget(min_healthy_fraction=0.0, max_price_ratio=0.0, max_draining_nodes=100)


def test_empties_expensive_nodes_onto_cheap_ones():
    st = toy()
    p = plan(st)
    assert p.solver == "milp" and p.optimal
    assert sorted(p.remove) == ["e1", "e2"]
    assert p.cost_before == pytest.approx(20.5) and p.cost_after == pytest.approx(4.5)
    assert p.savings_per_hour == pytest.approx(16.0)
    assert p.migrations == 3
    assert validate(st, p, Budget()) == []
    # a/A has 2 replicas and a healthy floor of 1: its two replicas move in different waves
    assert [sorted(w.nodes) for w in p.waves] == [["e1"], ["e2"]]
    assert p.lower_bound <= p.cost_after + 1e-9 and 0.0 <= p.gap < 0.01


def test_price_blind_ray_rule_does_worse_on_the_same_cluster():
    st = toy()
    final, steps = compact_to_fixpoint(st)
    # Ray's rule empties one 2-GPU node (never onto the idle l2) and stops: e1 still costs $8/h.
    assert [s.node for s in steps] == ["e2"]
    kept = final.occupied_nodes() | {"head"}
    assert final.cost_per_hour(kept) == pytest.approx(10.5)
    assert plan(st).cost_after < final.cost_per_hour(kept)


def test_head_node_is_never_drained_even_if_priciest():
    st = state(
        [node("head", 0, 50.0, head=True), node("w1", 2, 1.0), node("w2", 2, 1.0)],
        [dep("a/A", 1, 1)],
        {"w1": ["a/A"]},
    )
    p = plan(st)
    assert "head" in p.keep and "head" not in p.remove
    assert p.remove == ["w2"]


def test_label_selector_limits_destinations():
    st = state(
        [
            node("head", 0, 0, head=True),
            node("x", 2, 9, labels={"pool": "a"}),
            node("y", 4, 1, labels={"pool": "b"}),
            node("z", 4, 3, labels={"pool": "a"}),
        ],
        [dep("a/A", 1, 2, label_selectors=({"pool": "a"},))],
        {"x": ["a/A", "a/A"], "y": []},
    )
    p = plan(st, FREE)
    assert p.remove == ["x", "y"]  # A may only go to z (pool a), never to the cheaper y
    assert all(m.target == "z" for w in p.waves for m in w.moves)
    assert validate(st, p, FREE) == []


def test_selector_semantics_match_rays_matcher():
    from ray._raylet import node_labels_match_selector

    labels = [{}, {"pool": "a"}, {"pool": "b", "gpu": "L4"}, {"gpu": "H100"}]
    selectors = [{"pool": "a"}, {"pool": "!a"}, {"pool": "in(a,b)"}, {"pool": "!in(a,b)"}, {"gpu": "L4", "pool": "b"}, {}]
    for lab in labels:
        for sel in selectors:
            assert selector_matches(lab, sel) == node_labels_match_selector(lab, sel), (lab, sel)


def test_max_replicas_per_node_is_respected():
    st = state(
        [node("head", 0, 0, head=True), node("a", 4, 5), node("b", 4, 5), node("c", 4, 5)],
        [dep("x/X", 1, 3, max_replicas_per_node=1)],
        {"a": ["x/X"], "b": ["x/X"], "c": ["x/X"]},
    )
    p = plan(st, FREE)
    assert p.empty, "three replicas capped at one per node need all three nodes"


def test_foreign_work_and_immovable_replicas_block_their_nodes():
    st = state(
        [
            node("head", 0, 0, head=True),
            node("busy", 4, 9, foreign={"GPU": 1.0}, removable=False, reason="runs a training job"),
            node("pg", 4, 9),
            node("free", 8, 1),
        ],
        [dep("a/A", 1, 1), dep("p/P", 1, 1, movable=False, reason="placement group strategy SPREAD")],
        {"busy": ["a/A"], "pg": ["p/P"]},
    )
    p = plan(st, FREE)
    assert p.remove == ["free"], "only the idle node may go: the others' replicas would fit on it, but they are blocked"
    assert p.blocked["busy"] == "runs a training job"
    assert "cannot move" in p.blocked["pg"]
    assert "head" not in p.blocked


def test_budget_blocks_a_node_whose_replicas_would_all_move_at_once():
    st = state(
        [node("head", 0, 0, head=True), node("big", 4, 9), node("cheap", 4, 1)],
        [dep("a/A", 1, 3)],
        {"big": ["a/A", "a/A"], "cheap": ["a/A"]},
    )
    p = plan(st, Budget(min_healthy_fraction=0.5))  # 3 replicas: at most 2 in migration, but big holds 2 -> ok
    assert p.remove == ["big"]
    p = plan(st, Budget(max_moving_per_deployment=1))
    assert p.empty and "budget lets 1" in p.blocked["big"]


def test_waves_respect_max_draining_nodes():
    nodes = [node("head", 0, 0, head=True), node("big", 8, 4)] + [node(f"w{i}", 1, 3) for i in range(5)]
    st = state(nodes, [dep(f"d/D{i}", 1, 1) for i in range(5)], {f"w{i}": [f"d/D{i}"] for i in range(5)})
    p = plan(st, Budget(max_draining_nodes=2))
    assert sorted(p.remove) == [f"w{i}" for i in range(5)]
    assert [len(w.nodes) for w in p.waves] == [2, 2, 1]
    assert validate(st, p, Budget(max_draining_nodes=2)) == []


def test_premium_gpus_stay_free_for_models_that_need_them():
    a100 = {"ray.io/accelerator-type": "A100"}
    st = state(
        [node("head", 0, 0, head=True), node("p4d", 8, 32.0, labels=a100), node("l4", 4, 4.0)],
        [dep("big/Big", 4, 1, label_selectors=({"ray.io/accelerator-type": "A100"},)), dep("small/S", 1, 2)],
        {"p4d": ["big/Big"], "l4": ["small/S", "small/S"]},
    )
    price_only = Budget(min_healthy_fraction=0.0, max_price_ratio=0.0)
    assert plan(st, price_only).remove == ["l4"]  # price alone: stuff the free A100s
    p = plan(st, Budget(min_healthy_fraction=0.0))  # default ratio 3: $4/GPU is > 3x the L4's $1/GPU
    assert p.empty
    cost, keep, _ = optimum(st, max_price_ratio=3.0)
    assert cost == pytest.approx(36.0) and keep == {"head", "p4d", "l4"}


def test_draining_nodes_replicas_are_accounted_for():
    st = toy()
    st.nodes["e2"] = type(st.nodes["e2"])(**{**st.nodes["e2"].__dict__, "draining": True})
    p = plan(st, FREE)
    assert "e2" not in p.keep and "e2" not in p.remove
    assert p.remove == ["e1"]


def test_min_savings_and_migration_penalty():
    st = state(
        [node("head", 0, 0, head=True), node("a", 4, 2.1), node("b", 4, 2.0)],
        [dep("x/X", 1, 3)],
        {"a": ["x/X", "x/X", "x/X"], "b": ["x/X"]},
    )
    assert plan(st, FREE).remove == ["a"]  # cheapest kept set: b, at the price of three migrations
    # at $0.06/h per migration, keeping a ($2.10 + 1 move) beats keeping b ($2.00 + 3 moves)
    assert plan(st, Budget(min_healthy_fraction=0, max_price_ratio=0, migration_penalty_per_hour=0.06)).remove == ["b"]
    p = plan(st, Budget(min_healthy_fraction=0, min_savings_per_hour=5.0))
    assert p.empty and "under the $5.00/h minimum" in p.notes[0]
    p = plan(st, Budget(min_healthy_fraction=0, migration_penalty_per_hour=3.0))
    assert p.empty, "one migration must earn $3/h back; removing b saves only $2/h"


def test_greedy_fallback_is_valid_and_matches_here():
    st = toy()
    g = plan(st, method="greedy")
    assert g.solver == "greedy" and validate(st, g, Budget()) == []
    assert g.cost_after == pytest.approx(plan(st).cost_after)


def test_node_swap_advice():
    st = state(
        [node("head", 0, 0, head=True), node("h1", 8, 30.0), node("h2", 8, 30.0)],
        [dep("a/A", 2, 4)],
        {"h1": ["a/A", "a/A"], "h2": ["a/A", "a/A"]},
    )
    cheap = NodeType("l4x8", {"GPU": 8.0, "CPU": 8.0}, 13.0)
    p = plan(st, FREE, node_types=[cheap])
    assert p.remove == [] or p.cost_after == pytest.approx(30.0)
    p = plan(st, FREE)
    assert p.remove in (["h1"], ["h2"])  # 4 x 2 GPUs fit on one 8-GPU node
    p = plan(st, FREE, node_types=[cheap])
    assert p.advice, "one l4x8 at $13/h can replace the remaining $30/h node"
    a = p.advice[0]
    assert a.launch == {"l4x8": 1} and a.savings_per_hour == pytest.approx(17.0)
    assert "launch 1 x l4x8" in a.text


def test_plan_round_trips_through_json():
    st = toy()
    p = plan(st)
    again = Plan.from_dict(json.loads(json.dumps(p.to_dict())))
    assert again.to_dict() == p.to_dict()
    assert ClusterState.from_dict(json.loads(json.dumps(st.to_dict()))).fingerprint() == st.fingerprint()


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="use auto, milp or greedy"):
        plan(toy(), method="simplex")
