"""liftoff compaction on a real Ray cluster: a head and 4 fake-GPU workers of two price classes, three
Serve deployments, HTTP load on 127.0.0.1 throughout. One cluster for the module; tests run in order.

The story: traffic starts while only the expensive H100 nodes exist (chat: 1 GPU, at most one per node;
embed: 1 GPU), cheap L4 nodes join at the peak (big: 2 GPUs, more embed), then traffic falls. The
expensive nodes keep replicas they no longer need; `liftoff compact run` must empty and release them
without failing a request.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from liftoff import cli as liftoff_cli
from serve_integration.compaction.providers import ClusterUtilsProvider, register_provider, unregister_provider
from tests.compaction import apps
from tests.compaction.livecluster import CHEAP, EXPENSIVE, LiveCluster, LoadLoop, wait_for
from tests.conftest import ROOT, run_cli

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def live():
    from ray import serve

    if not os.path.isdir("/dev/shm"):
        pytest.skip("Ray needs /dev/shm")
    lc = LiveCluster()
    ray.cloudpickle.register_pickle_by_value(apps)
    try:
        lc.add("e1", 2, EXPENSIVE)
        lc.add("e2", 2, EXPENSIVE)
        serve.run(apps.model("chat", 1, 2, max_per_node=1), name="chat", route_prefix="/chat", blocking=False)
        serve.run(apps.model("embed", 1, 2), name="embed", route_prefix="/embed", blocking=False)
        wait_for(lambda: lc.settled({"chat": 2, "embed": 2}), 90, "chat and embed on the H100 nodes")
        lc.add("l1", 4, CHEAP)
        lc.add("l2", 4, CHEAP)
        serve.run(apps.model("big", 2, 2), name="big", route_prefix="/big", blocking=False)
        serve.run(apps.model("embed", 1, 4), name="embed", route_prefix="/embed", blocking=False)
        wait_for(lambda: lc.settled({"chat": 2, "embed": 4, "big": 2}), 90, "the peak")
        lc.load = LoadLoop(lc.port, ["/chat", "/embed", "/big"]).start()
        serve.run(apps.model("embed", 1, 1), name="embed", route_prefix="/embed", blocking=False)
        serve.run(apps.model("big", 2, 1), name="big", route_prefix="/big", blocking=False)
        wait_for(lambda: lc.settled({"chat": 2, "embed": 1, "big": 1}), 90, "the scale-down")
        yield lc
    finally:
        if getattr(lc, "load", None):
            lc.load.stop()
        lc.stop()


def _ids(live, *names):
    return {live.node_id(n) for n in names}


def test_plan_cli_drains_the_expensive_nodes(live):
    placement = live.placement()
    assert "chat" in placement["e1"] and "chat" in placement["e2"], placement  # the story held
    out = run_cli("compact", "plan", "--address", live.address, "--warmup-seconds", "0", "--json", timeout=120)
    doc = json.loads(out.stdout)
    plan = doc["plan"]
    assert set(plan["remove"]) >= _ids(live, "e1", "e2")
    assert plan["cost_after"] == pytest.approx(4.5)  # head $0.50 + both L4 nodes
    assert plan["solver"] == "milp" and plan["optimal"]
    # every replica started within the hour: all still warming up; then no migrations allowed all day
    for flags, why in (
        (["--warmup-seconds", "3600"], "still warming up"),
        (["--warmup-seconds", "0", "--budget", "00:00-24:00=0"], "migration(s) per plan"),
    ):
        held = json.loads(run_cli("compact", "plan", "--address", live.address, *flags, "--json", timeout=120).stdout)
        assert not set(held["plan"]["remove"]) & _ids(live, "e1", "e2"), held["plan"]
        assert all(why in held["plan"]["blocked"][n] for n in _ids(live, "e1", "e2")), held["plan"]["blocked"]
    table = run_cli("compact", "plan", "--address", live.address, "--warmup-seconds", "0", timeout=120).stdout
    assert "drain in wave" in table and "keep (head)" in table and "h100x2" in table


def test_compact_run_empties_the_expensive_nodes_with_no_failed_request(live, tmp_path):
    from serve_integration.compaction.cluster import RayCluster

    before = live.load.ok
    start = RayCluster(live.address).snapshot()
    provider = ClusterUtilsProvider(live.cluster)
    register_provider("test-cluster-utils", lambda args: provider)
    state_file = tmp_path / "inflight.json"
    try:
        rc = liftoff_cli.main([
            "compact", "run", "--address", live.address, "--once", "--provider", "test-cluster-utils", "--warmup-seconds", "0",
            "--state", str(state_file), "--stability-window", "0", "--interval", "1",
            "--replica-start-timeout", "60", "--release-timeout", "30", "--poll", "0.5",
        ])  # fmt: skip
    finally:
        unregister_provider("test-cluster-utils")
    assert rc == 0
    assert set(provider.released) == _ids(live, "e1", "e2")
    assert not _ids(live, "e1", "e2") & live.alive()
    assert live.settled({"chat": 2, "embed": 1, "big": 1})
    assert set(live.placement()) <= {"l1", "l2"}
    assert not state_file.exists()
    time.sleep(1.0)
    end = RayCluster(live.address).snapshot()
    result = {
        "cost_before": start.cost_per_hour(),
        "cost_after": end.cost_per_hour(),
        "released": sorted(live.name_of(n) for n in provider.released),
        "migrations": len({r.replica_id for r in end.replicas} - {r.replica_id for r in start.replicas}),
        "requests_ok": live.load.ok,
        "requests_failed": live.load.failed,
    }
    print("LIFTOFF-RUN " + json.dumps(result))
    assert end.cost_per_hour() == pytest.approx(4.5)
    assert live.load.failed == 0, live.load.errors[:5]
    assert live.load.ok > before
    assert all(live.load.per_route.get(r, 0) > 0 for r in ("/chat", "/embed", "/big"))


def _controller(live, provider, state_path, **executor):
    from serve_integration.compaction.cluster import RayCluster
    from serve_integration.compaction.controller import Controller, ControllerConfig
    from serve_integration.compaction.executor import ExecutorConfig
    from serve_integration.compaction.state import FileStore

    cfg = ControllerConfig(
        stability_window_s=0, interval_s=1, executor=ExecutorConfig(poll_s=0.5, release_timeout_s=30, **executor)
    )
    return Controller(RayCluster(live.address), provider, FileStore(state_path), cfg)


def test_replacement_failing_its_health_check_aborts_without_losing_capacity(live, tmp_path):
    from ray import serve

    flag = tmp_path / "fail-new-replicas"
    live.add("x1", 1, {**EXPENSIVE, "liftoff.io/pool": "fault"})
    serve.run(
        apps.model("fragile", 1, 1, selector={"liftoff.io/pool": "fault"}, fault_flag=str(flag)),
        name="fragile", route_prefix="/fragile", blocking=False,
    )  # fmt: skip
    wait_for(lambda: live.settled({"chat": 2, "embed": 1, "big": 1, "fragile": 1}), 90, "fragile on x1")
    live.add("x2", 1, {**CHEAP, "liftoff.io/pool": "fault"})
    load = LoadLoop(live.port, ["/fragile", "/chat"]).start()
    alive_before = live.alive()
    flag.touch()  # from now on, new fragile replicas fail their health check
    provider = ClusterUtilsProvider(live.cluster)
    ctl = _controller(live, provider, tmp_path / "state.json", replica_start_timeout_s=40, unhealthy_grace_s=4)
    step = ctl.run(once=True)
    x1 = live.node_id("x1")
    assert step.plan is not None and step.plan.remove == [x1]
    assert step.outcome is not None and step.outcome.status == "aborted"
    assert "fragile" in step.outcome.reason and "fails its health check" in step.outcome.reason
    # nothing lost: x1 still up and still serving fragile, drain deadline lifted, no node released
    assert live.alive() == alive_before and provider.released == []
    assert ctl.cluster.draining().get(x1) == 0
    assert "fragile" in live.placement().get("x1", [])
    assert ctl.metrics.value("liftoff_compaction_failures_total", {"reason": "abort"}) == 1
    assert ctl.failures == 1 and ctl.backoff_until > time.time()
    time.sleep(2)
    assert load.failed == 0, load.errors[:5]
    assert load.per_route.get("/fragile", 0) > 0

    # Fixed: Serve's retries bring the replacement up on x2, x1 empties; a restarted controller releases it.
    flag.unlink()
    wait_for(lambda: live.placement().get("x2") == ["fragile"] and "x1" not in live.placement(), 120, "fragile on x2")
    again = _controller(live, provider, tmp_path / "state.json", replica_start_timeout_s=40)
    step = again.step()
    assert step.action == "recovered", step.reason
    assert provider.released == [x1]
    assert not (tmp_path / "state.json").exists()
    load.stop()
    assert load.failed == 0, load.errors[:5]


def test_restart_rolls_back_a_plan_that_never_drained(live, tmp_path):
    from serve_integration.compaction.state import Journal

    provider = ClusterUtilsProvider(live.cluster)
    ctl = _controller(live, provider, tmp_path / "state.json", replica_start_timeout_s=30)
    snap = ctl.cluster.snapshot()
    victim = live.node_id("l1")
    journal = Journal(ctl.journal.store, owner="killed-controller", cluster_id=ctl.journal.cluster_id)
    record = journal.begin(ctl.plan_now(snap).to_dict())
    journal.update(record, phase="draining", wave=0, nodes=[victim], wave_nodes={victim: snap.nodes[victim].__dict__})
    result = ctl.recover()  # killed after journaling the wave, before the drain reached the GCS
    assert result is not None and result.outcome.status == "rolled_back"
    assert victim not in ctl.cluster.draining() and victim in live.alive()
    assert not (tmp_path / "state.json").exists()


def test_controller_killed_mid_plan_resumes_after_restart(live, tmp_path):
    from ray import serve

    live.add("y1", 1, {**EXPENSIVE, "liftoff.io/pool": "slow"})
    serve.run(
        apps.model("slow", 1, 1, selector={"liftoff.io/pool": "slow"}, load_s=5),
        name="slow", route_prefix="/slow", blocking=False,
    )  # fmt: skip
    wait_for(lambda: live.settled({"chat": 2, "embed": 1, "big": 1, "fragile": 1, "slow": 1}), 90, "slow on y1")
    live.add("y2", 1, {**CHEAP, "liftoff.io/pool": "slow"})
    load = LoadLoop(live.port, ["/slow"]).start()
    state = tmp_path / "inflight.json"
    cmd = [
        sys.executable, "-m", "liftoff", "--log-level", "info", "compact", "run", "--address", live.address, "--once",
        "--warmup-seconds", "0",  # the replicas here started seconds ago: no warm-up protection
        "--state", str(state), "--provider", "ray", "--stability-window", "0", "--interval", "1",
        "--replica-start-timeout", "60", "--release-timeout", "60", "--poll", "0.5",
    ]  # fmt: skip
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def phase():
        try:
            return json.loads(state.read_text()).get("phase")
        except (OSError, ValueError):
            return None

    try:
        wait_for(lambda: phase() == "draining", 60, "the first controller to start draining", poll=0.05)
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=30)
    y1 = live.node_id("y1")
    from serve_integration.compaction.cluster import RayCluster

    assert y1 in RayCluster(live.address).draining()  # killed mid-plan: y1 drains, nobody watches
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "recovered: resumed" in done.stdout, done.stdout
    assert "resuming wave 0" in done.stderr
    assert y1 not in live.alive()
    assert live.placement().get("y2") == ["slow"]
    assert not state.exists()
    load.stop()
    assert load.failed == 0, load.errors[:5]
    live.cluster.remove_node(live.nodes["y1"])  # the raylet exited on its own; clean up after it


def test_node_swap_advice_reaches_the_autoscaler(live, tmp_path):
    """With --act-on-advice, advice becomes a request_resources call with the node type's label selector."""
    from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    from serve_integration.compaction.planner import NodeType

    ctl = _controller(live, ClusterUtilsProvider(live.cluster), tmp_path / "state.json")
    big = NodeType("l4x8", {"GPU": 8.0, "CPU": 1.0}, 1.0, {"ray.io/node-group": "l4x8"})
    ctl.config.node_types = (big,)
    ctl.config.act_on_advice = True
    step = ctl.step()
    assert step.action == "advised", step.reason
    assert step.plan.empty and step.plan.advice[0].launch == {"l4x8": 2}  # two, for chat's one-per-node limit
    assert not is_autoscaler_v2()  # no autoscaler runs here: Ray uses the v1 channel in the GCS KV
    assert json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)) == [big.resources, big.resources]
    assert ctl.step().action == "planned"  # one request at a time while the nodes boot
    ctl.clear_request()
    assert json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)) == []


def test_controller_runs_as_a_ray_actor(live):
    from serve_integration.compaction.controller import ControllerConfig, start_actor

    actor = start_actor(ControllerConfig(dry_run=True, stability_window_s=0), name="liftoff-compaction-test")
    try:
        doc = ray.get(actor.plan.remote(), timeout=120)
        assert doc["cost_before"] >= doc["cost_after"] and "waves" in doc
        step = ray.get(actor.step.remote(), timeout=120)
        assert step["action"] in ("planned", "waiting")
        status = ray.get(actor.status.remote(), timeout=60)
        assert status["running"] is False and status["failures"] == 0
    finally:
        ray.kill(actor)
