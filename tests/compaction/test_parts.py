"""The pieces around the planner that need no cluster: CLI, prices, journal, loop timing, providers, simulator."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import requests

from serve_integration.compaction.cluster import ClusterError, Pricing
from serve_integration.compaction.controller import decide, signature
from serve_integration.compaction.metrics import Metrics
from serve_integration.compaction.planner import plan
from serve_integration.compaction.providers import CommandProvider, kuberay_scale_down, make_provider
from serve_integration.compaction.simulate import default_scenario, demand_traces, run_all
from serve_integration.compaction.state import FileStore, Journal
from tests.compaction.builders import toy
from tests.compaction.livecluster import free_port
from tests.conftest import ROOT, run_cli


def test_compact_commands_are_listed():
    out = run_cli("compact", "--help").stdout
    for cmd in ("plan", "run", "simulate"):
        assert cmd in out


def test_unreachable_cluster_is_a_clear_error():
    done = run_cli("compact", "plan", "--address", "127.0.0.1:1", check=False, timeout=60)
    assert done.returncode == 1
    assert "nothing answers at 127.0.0.1:1" in done.stderr and "GCS address" in done.stderr
    done = run_cli("compact", "plan", "--address", "not-an-address", check=False, timeout=60)
    assert done.returncode == 1 and "is not HOST:PORT" in done.stderr


def test_unknown_provider_fails_before_connecting():
    done = run_cli("compact", "run", "--address", "127.0.0.1:1", "--provider", "nope", check=False, timeout=60)
    assert done.returncode == 1 and "unknown node provider 'nope'" in done.stderr


def test_importing_the_cli_pulls_in_neither_ray_nor_scipy():
    code = (
        "import sys, argparse; from serve_integration.compaction import cli, controller, planner, simulate; "
        "p = argparse.ArgumentParser(); cli.register(p.add_subparsers()); "
        "print(sorted(m for m in ('ray', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_pricing_label_table_default_and_errors(tmp_path):
    table = tmp_path / "prices.json"
    table.write_text(json.dumps({"prices": {"g6.12xlarge": 4.6, "A100": 4.1}, "default": 9.0}))
    p = Pricing.load(table)
    assert p.price("n1", {"liftoff.io/price-per-hour": "1.5"}, ["g6.12xlarge"], False) == 1.5
    assert p.price("n1", {}, ["g6.12xlarge"], False) == 4.6
    assert p.price("n1", {"ray.io/accelerator-type": "A100"}, [], False) == 4.1
    assert p.price("n1", {}, ["other"], False) == 9.0
    bare = Pricing()
    assert bare.price("head", {}, [], True) == 0.0
    with pytest.raises(ClusterError, match=r"has no price: give it the label liftoff\.io/price-per-hour"):
        bare.price("abcdef0123456789", {}, ["l4x4"], False)
    with pytest.raises(ClusterError, match="not a number"):
        bare.price("n", {"liftoff.io/price-per-hour": "cheap"}, [], False)
    table.write_text("[1, 2]")
    with pytest.raises(ClusterError, match="must be a JSON object"):
        Pricing.load(table)


def test_file_journal_is_atomic_and_says_when_corrupt(tmp_path):
    store = FileStore(tmp_path / "j.json")
    journal = Journal(store, owner="me", cluster_id="c1")
    assert journal.load() is None
    rec = journal.begin(plan(toy()).to_dict())
    journal.update(rec, phase="draining", wave=0, nodes=["e1"])
    again = journal.load()
    assert again["phase"] == "draining" and again["cluster_id"] == "c1" and again["history"][-1]["phase"] == "draining"
    assert not (tmp_path / "j.json.tmp").exists()
    journal.clear()
    assert journal.load() is None
    (tmp_path / "j.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        journal.load()


def test_loop_timing_rules():
    assert decide(100, 0, 60, True, "", 0) == (True, "")
    go, why = decide(100, 90, 60, True, "", 0)
    assert not go and "stability window: 10s of 60s" in why
    go, why = decide(100, 0, 60, False, "deployment a/A is UPSCALING", 0)
    assert not go and "UPSCALING" in why
    go, why = decide(100, 0, 60, True, "", 400)
    assert not go and "backing off" in why
    st = toy()
    sig = signature(st)
    st.deployments["a/A"] = type(st.deployments["a/A"])(**{**st.deployments["a/A"].__dict__, "target_replicas": 5})
    assert signature(st) != sig


def test_providers_without_a_cluster():
    with pytest.raises(ClusterError, match="needs --release-command"):
        CommandProvider("")
    with pytest.raises(ClusterError, match="unknown node provider"):
        make_provider("nope")
    cr = {"spec": {"workerGroupSpecs": [{"groupName": "gpu", "replicas": 3, "minReplicas": 0}]}}
    spec = kuberay_scale_down(cr, "gpu", "pod-1")
    assert spec["workerGroupSpecs"][0]["replicas"] == 2
    assert spec["workerGroupSpecs"][0]["scaleStrategy"]["workersToDelete"] == ["pod-1"]
    assert kuberay_scale_down({"spec": spec}, "gpu", "pod-1") == spec  # idempotent
    with pytest.raises(ClusterError, match="no worker group 'cpu'"):
        kuberay_scale_down(cr, "cpu", "pod-1")


def test_render_plan_and_metrics():
    from serve_integration.compaction.cli import render_plan

    st = toy()
    text = render_plan(st, plan(st))
    assert "release 2, save $16.00/h" in text and "drain in wave 1" in text and "keep (head)" in text
    m = Metrics()
    m.nodes_released.inc(2)
    m.failures.labels("abort").inc()
    assert m.value("liftoff_compaction_nodes_released_total") == 2
    assert m.value("liftoff_compaction_failures_total", {"reason": "abort"}) == 1
    port = free_port()
    m.serve(port, addr="127.0.0.1")
    body = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert "liftoff_compaction_nodes_released_total 2.0" in body


def test_traces_are_seeded_and_shaped():
    sc = default_scenario(hours=24, step_s=300, seed=3)
    a, b = demand_traces(sc), demand_traces(sc)
    assert a == b and len(a["chat-8b"]) == 24 * 12
    decay = a["summarize-13b"]
    start = int(3 * 3600 / 300)
    assert decay[start + 2] > 3 * decay[-1]  # the launch spike decays
    burst = a["embed"]
    assert max(burst) > 2 * sorted(burst)[len(burst) // 2]  # bursts stand out of the median


def test_simulator_runs_every_policy_on_the_same_trace():
    res = run_all(default_scenario(hours=8, step_s=120, seed=2), advice=False)
    runs = res["runs"]
    assert set(runs) == {"none", "ray", "ray-active", "karpenter", "liftoff", "optimum"}
    assert runs["none"]["migrations"] == 0 and runs["optimum"]["migrations"] == 0
    lift = runs["liftoff"]
    assert lift["own_bound_dollars"] <= lift["dollars"] + 1e-6  # the per-step optimum is a floor
    for r in runs.values():
        assert 0 < r["served_fraction"] <= 1.0 and r["tokens_per_gpu_second"] > 0
