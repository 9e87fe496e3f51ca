"""Scenario files: the shipped ones run end to end, malformed ones end in one line naming file, line and field."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from layerstore.errors import LiftoffError
from serve_integration.compaction.cli import parse_load_times
from serve_integration.compaction.scenario import load_scenario
from serve_integration.compaction.simulate import default_scenario, demand_traces, headroom, run_scenario

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "compaction"
SHIPPED = sorted(EXAMPLES.glob("*.yaml"))


def test_the_default_scenario_file_is_the_built_in_scenario():
    built, filed = default_scenario(), load_scenario(EXAMPLES / "default.yaml")
    assert filed.node_types == built.node_types
    assert filed.deployments == built.deployments
    for f in ("hours", "step_s", "boot_s", "idle_timeout_s", "target_utilization", "head_price", "budget", "liftoff_window_s"):
        assert getattr(filed, f) == getattr(built, f), f
    assert demand_traces(replace(filed, seed=3)) == demand_traces(replace(built, seed=3))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_scenarios_keep_the_planner_within_2_percent_of_the_optimum(path):
    sc = replace(load_scenario(path), hours=8.0)
    res = run_scenario(sc, [1], policies=("none", "liftoff", "optimum"))
    s = res["summary"]
    assert s["liftoff_dollars_over_optimum"] <= 0.02, s
    assert s["liftoff_dollars_over_own_bound"] <= 0.02, s
    assert res["totals"]["liftoff"]["served_fraction"] > 0.9


def test_small_cluster_reads_its_traffic_csv_and_budget_windows():
    sc = load_scenario(EXAMPLES / "small-cluster.yaml")
    assert set(sc.traces) == {"chat-8b", "rerank"}
    assert sc.traces["chat-8b"][0][0] == 0.0 and sc.traces["chat-8b"][-1][0] == 24 * 3600
    assert sc.boot_time("m7i.2xlarge") == 90 and sc.boot_time("nope") == sc.boot_s
    assert sc.budget.at(12 * 3600).max_migrations == 0 and sc.budget.at(20 * 3600).max_migrations is None
    embed = next(d for d in sc.deployments if d.name == "embed-cpu")
    assert embed.gpus == 0 and embed.demand == {"CPU": 4.0, "memory": 8.0}


def test_cli_runs_a_user_scenario_end_to_end_with_json_and_plot(tmp_path):
    png = tmp_path / "out.png"
    cmd = [sys.executable, "-m", "liftoff", "compact", "simulate", "--scenario", str(EXAMPLES / "small-cluster.yaml")]
    done = subprocess.run(
        [
            *cmd,
            "--hours",
            "3",
            "--seeds",
            "1",
            "--policies",
            "none,ray,ray-active,karpenter,liftoff,optimum",
            "--json",
            "--plot",
            str(png),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    res = json.loads(done.stdout)
    assert set(res["totals"]) == {"none", "ray", "ray-active", "karpenter", "liftoff", "optimum"}
    assert res["scenario"] == "small-cluster" and res["hours"] == 3
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


BASE = """\
name: t
hours: 2
node_types:
  - name: a
    resources: {GPU: 4, CPU: 16}
    price_per_hour: 4
deployments:
  - name: m
    gpus: 1
    tokens_per_s: 1000
    traffic: {pattern: flat, base: 500}
"""


@pytest.mark.parametrize(
    "text,expected",
    [
        (BASE.replace("gpus: 1", 'gpus: "two"'), 'bad.yaml:9: deployments[0].gpus: expected a whole number >= 0, got "two"'),
        (
            BASE.replace("price_per_hour: 4", "price_per_hour: -4"),
            "bad.yaml:6: node_types[0].price_per_hour: expected a number >= 0",
        ),
        (BASE.replace("pattern: flat", "pattern: weekly"), "bad.yaml:11: deployments[0].traffic.pattern: expected one of"),
        (BASE + "    colour: red\n", "bad.yaml:12: deployments[0].colour: unknown field"),
        (BASE.replace("    traffic: {pattern: flat, base: 500}\n", ""), "bad.yaml:8: deployments[0].traffic: missing"),
        (BASE.replace("GPU: 4", "GPU: 0"), "bad.yaml:8: deployments[0]: no node type can hold one replica of m"),
        (BASE + 'budgets: [{schedule: "9-18", max_migrations: 0}]\n', 'bad.yaml:12: budgets[0].schedule: expected "HH:MM-HH:MM"'),
        (BASE.replace("hours: 2", "hours: [2"), "bad.yaml:3: not valid YAML"),
        (BASE.replace("traffic: {pattern: flat, base: 500}", "traffic: csv"), "bad.yaml:11: deployments[0].traffic: m takes"),
        ("- just\n- a list\n", "bad.yaml: (top): expected a mapping"),
    ],
)
def test_malformed_scenarios_name_file_line_and_field(tmp_path, text, expected):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(LiftoffError) as e:
        load_scenario(f)
    msg = str(e.value)
    assert msg.startswith(expected), msg
    assert "\n" not in msg


def test_cli_prints_one_line_for_a_malformed_scenario(tmp_path):
    f = tmp_path / "scenario.yaml"
    f.write_text(BASE.replace("gpus: 1", "gpus: two"))
    done = subprocess.run(
        [sys.executable, "-m", "liftoff", "compact", "simulate", "--scenario", str(f)], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and 'scenario.yaml:9: deployments[0].gpus: expected a whole number >= 0, got "two"' in lines[0]


def test_toml_scenario_and_traffic_csv_errors(tmp_path):
    (tmp_path / "t.csv").write_text("timestamp,deployment,value\n2026-01-01T00:00:00Z,m,100\n2026-01-01T01:00:00Z,m,lots\n")
    toml = """\
name = "t"
hours = 1
[[node_types]]
name = "a"
price_per_hour = 4
resources = {GPU = 4, CPU = 16}
[[deployments]]
name = "m"
gpus = 1
tokens_per_s = 1000
traffic = "csv"
[traffic_file]
path = "t.csv"
"""
    (tmp_path / "s.toml").write_text(toml)
    with pytest.raises(LiftoffError, match=r"^t\.csv:3: m: expected a number, got 'lots'$"):
        load_scenario(tmp_path / "s.toml")
    (tmp_path / "t.csv").write_text("timestamp,m\n0,100\n1800,300\n3600,200\n")  # the wide layout
    sc = load_scenario(tmp_path / "s.toml")
    assert sc.traces["m"] == [(0.0, 100.0), (1800.0, 300.0), (3600.0, 200.0)]
    trace = demand_traces(replace(sc, step_s=900))["m"]
    assert trace == [100.0, 200.0, 300.0, 250.0]
    (tmp_path / "t.csv").write_text("timestamp,deployment,value\n0,other,1\n")
    with pytest.raises(LiftoffError, match=r"deployment 'other' is not in s\.toml"):
        load_scenario(tmp_path / "s.toml")
    (tmp_path / "s.toml").write_text(toml.replace("hours = 1", 'hours = "one'))
    with pytest.raises(LiftoffError, match=r"^s\.toml: not valid TOML: .*line 2"):
        load_scenario(tmp_path / "s.toml")


def test_load_times_from_spec_and_from_the_scaleup_results_file(tmp_path):
    a, b = parse_load_times("baseline=600,liftoff=107")
    assert (a.name, a.seconds, b.name, b.seconds) == ("baseline", 600.0, "liftoff", 107.0)
    report = {
        "results": {
            "shaped": {
                "baseline": [{"total": t} for t in (15.0, 16.0, 14.0)],
                "liftoff": [{"total": t} for t in (5.0, 4.0, 6.0)],
            }
        }
    }
    (tmp_path / "scaleup.json").write_text(json.dumps(report))
    base, fast = parse_load_times(str(tmp_path / "scaleup.json"))
    assert base.factor == 1.0 and fast.factor == pytest.approx(5.0 / 15.0)
    for bad in ("baseline", "baseline=fast", "=3", "a=-1"):
        with pytest.raises(LiftoffError, match="--load-times: expected NAME=SECONDS"):
            parse_load_times(bad)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(LiftoffError, match="not a scale-up results file"):
        parse_load_times(str(tmp_path / "x.json"))


def test_faster_scale_up_needs_no_more_headroom():
    sc = replace(load_scenario(EXAMPLES / "small-cluster.yaml"), hours=6.0)
    slow, fast = parse_load_times("slow=900,fast=60")
    res = headroom(sc, [1], [slow, fast], slo=0.95)
    hs, hf = res["paths"]["slow"]["headroom"], res["paths"]["fast"]["headroom"]
    assert hf is not None
    # a higher target utilization is less headroom
    assert hs is None or hf >= hs
    for name in ("slow", "fast"):
        e = res["paths"][name]
        if e["headroom"] is not None:
            assert e["runs"]["none"]["in_time_fraction"] >= 0.95
            assert set(e["runs"]) == {"none", "liftoff"}
