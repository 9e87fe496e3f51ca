"""`liftoff snapshotter`: the config snippet, the socket's permissions, refusals, and a clean SIGTERM stop."""

from __future__ import annotations

import configparser
import os
import signal
import stat
import subprocess
import sys
import time
import tomllib

from tests.conftest import ROOT, run_cli


def test_config_snippet_is_valid_containerd_toml():
    out = run_cli("snapshotter", "config", "--socket", "/run/liftoff/x.sock").stdout
    config = tomllib.loads(out)
    assert config["proxy_plugins"]["liftoff"] == {"type": "snapshot", "address": "/run/liftoff/x.sock"}
    cri = config["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert cri["snapshotter"] == "liftoff"
    assert cri["disable_snapshot_annotations"] is False
    default = tomllib.loads(run_cli("snapshotter", "config").stdout)
    assert default["proxy_plugins"]["liftoff"]["address"] == "/run/liftoff/snapshotter.sock"


def test_socket_is_0660_in_a_0700_directory_and_sigterm_stops_cleanly(fresh_snapshotter):
    sock = fresh_snapshotter.socket
    assert stat.S_ISSOCK(os.stat(sock).st_mode)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
    assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o700
    assert fresh_snapshotter.stop() == 0
    assert not sock.exists()
    assert "SIGTERM: stopping" in fresh_snapshotter.log()


def test_sigterm_as_soon_as_the_socket_appears_stops_cleanly(tmp_path):
    """A supervisor (or containerd's conformance suite) may stop the snapshotter the moment its socket
    appears: that must be the clean stop (exit 0, socket removed), never death by the default signal action."""
    sock = tmp_path / "run" / "s.sock"
    argv = [sys.executable, "-m", "liftoff", "snapshotter", "--root", str(tmp_path / "root"), "--socket", str(sock)]
    with open(tmp_path / "log", "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=log)
    deadline = time.monotonic() + 60
    while not sock.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0002)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, (tmp_path / "log").read_text()
    assert not sock.exists()


def test_refuses_a_second_instance_a_shared_directory_and_a_live_socket(fresh_snapshotter, tmp_path):
    root = str(fresh_snapshotter.root)
    done = run_cli("snapshotter", "--root", root, "--socket", str(tmp_path / "own" / "s.sock"), check=False, timeout=60)
    assert done.returncode == 1 and "another liftoff snapshotter is using" in done.stderr

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    done = run_cli("snapshotter", "--root", str(tmp_path / "r1"), "--socket", str(shared / "s.sock"), check=False, timeout=60)
    assert done.returncode == 1 and "private directory" in done.stderr

    sock = str(fresh_snapshotter.socket)
    done = run_cli("snapshotter", "--root", str(tmp_path / "r2"), "--socket", sock, check=False, timeout=60)
    assert done.returncode == 1 and "another process is serving" in done.stderr

    done = run_cli(
        "snapshotter", "--root", str(tmp_path / "r3"), "--socket", str(tmp_path / "m" / "s"), "--metrics", "nope", check=False
    )
    assert done.returncode == 1 and "bad metrics address" in done.stderr


def test_systemd_unit():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(ROOT / "deploy" / "liftoff-snapshotter.service")
    assert unit["Unit"]["Before"] == "containerd.service"
    assert unit["Service"]["Restart"] == "on-failure"
    assert unit["Service"]["Type"] == "notify"
    exec_start = unit["Service"]["ExecStart"].split()
    assert exec_start[1:3] == ["--config", "/etc/liftoff/config.toml"]  # settings from the one config file
    assert exec_start[3:4] == ["snapshotter"] and "--socket" in exec_start and "--root" in exec_start
    assert unit["Service"]["RuntimeDirectoryMode"] == "0700"
