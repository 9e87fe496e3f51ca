"""containerd's own snapshotter conformance suite (snapshots/testsuite), run by scripts/conformance:
every test that passes on containerd's overlayfs snapshotter must pass on `liftoff snapshotter`, both
called directly and under containerd's metadata layer (`-md`: `<ns>/<seq>/` keys, no namespace header)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "conformance"
SUITE_TESTS = 21  # containerd 1.6.20's SnapshotterSuite (Rename is skipped by the suite itself); later ones add tests
PAIRS = {"liftoff": "overlayfs", "liftoff-md": "overlayfs-md"}  # each liftoff run and its control


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.fail("containerd's snapshotter suite mounts filesystems: run these tests as root")


def _conformance(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    report = tmp_path / "conformance.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(report), *args], capture_output=True, text=True, timeout=540
    )
    assert report.exists(), f"scripts/conformance wrote no results (exit {done.returncode}):\n{done.stdout}{done.stderr}"
    return done, json.loads(report.read_text())


def test_liftoff_passes_what_overlayfs_passes(tmp_path):
    done, report = _conformance(tmp_path)
    output = done.stdout + done.stderr
    results = report["results"]
    assert len(results) >= SUITE_TESTS, output
    for run, control in PAIRS.items():
        passing = [name for name, by_suite in results.items() if by_suite.get(control) == "PASS"]
        assert len(passing) >= SUITE_TESTS - 1, f"the {control} control itself fails here:\n{output}"
        failing = [name for name in passing if results[name].get(run) != "PASS"]
        assert not failing, f"{run} fails {failing}, which {control} passes:\n{output}"
    assert report["regressions"] == [] and done.returncode == 0, output
    assert f"summary: {len(results)} tests; overlayfs" in done.stdout


def test_the_script_fails_when_liftoff_does(tmp_path):
    """A liftoff that cannot serve fails the run (exit 1), names the tests and says why in the table."""
    broken = tmp_path / "liftoff"
    broken.write_text("#!/bin/sh\necho 'deliberately broken' >&2\nexit 3\n")
    broken.chmod(0o755)
    done, report = _conformance(tmp_path, "--liftoff", str(broken), "--run", "^(Basic|StatActive)$")
    assert done.returncode == 1, done.stdout + done.stderr
    assert report["results"] == {
        name: {"overlayfs": "PASS", "liftoff": "FAIL", "overlayfs-md": "PASS", "liftoff-md": "FAIL"}
        for name in ("Basic", "StatActive")
    }
    assert report["regressions"] == ["liftoff/Basic", "liftoff-md/Basic", "liftoff/StatActive", "liftoff-md/StatActive"]
    assert "FAILED on liftoff but passed on overlayfs: liftoff/Basic" in done.stderr
