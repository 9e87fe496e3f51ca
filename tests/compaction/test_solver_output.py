"""HiGHS prints some MIP diagnostics with printf whatever its options say: the planner keeps them out
of the process's stdout (checked on file descriptor 1 of a separate process, where printf writes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

# A cluster snapshot taken from `liftoff compact simulate` (seed 1, 48 h, step 1082) on which the node-swap
# advice program made HiGHS print "HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();".
CHATTY = Path(__file__).parent / "data" / "highs_chatty_state.json"

PLAN = """
import json, sys
from serve_integration.compaction.model import ClusterState
from serve_integration.compaction.planner import Budget, NodeType, plan
d = json.load(open(sys.argv[1]))
p = plan(ClusterState.from_dict(d["state"]), Budget(**d["budget"]), time_limit_s=d["time_limit_s"],
         node_types=[NodeType(**t) for t in d["node_types"]], advice_min_fraction=d["advice_min_fraction"])
print("remove", *p.remove)
"""

PASS_THROUGH = """
import os
from serve_integration.compaction.planner import _solver_stdout_silenced
print("before", flush=True)
with _solver_stdout_silenced():
    os.write(1, b"HighsMipSolverData::something internal\\n")
    print("another thread's line")
print("after")
"""


def python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_the_planner_prints_no_solver_diagnostics():
    done = python(PLAN, str(CHATTY))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("remove"), done.stdout  # the plan, and nothing from the solver


def test_other_output_during_a_solve_is_kept_in_order():
    done = python(PASS_THROUGH)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "before\nanother thread's line\nafter\n"


@pytest.mark.slow
def test_compact_simulate_output_is_only_its_results():
    """The command as a user ran it: seed 1 reaches the snapshot above (about 2 minutes on 2 cores)."""
    done = run_cli("compact", "simulate", "--seeds", "1", "--json", timeout=900)
    assert "Highs" not in done.stdout
    assert json.loads(done.stdout)["seeds"] == [1]  # nothing but the JSON document on stdout
