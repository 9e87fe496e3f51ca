"""`liftoff node install | uninstall` against Debian's containerd 1.6: the user's config.toml keeps every byte but
liftoff's keys, containerd comes back listing the liftoff snapshotter, uninstall gives the original back.

containerd runs on a private root, state and socket; `--restart-command` restarts that instance (a helper
script below stands in for systemd). Only containerd 1.6 can run here: version 3 (containerd 2.x) configs are
tested on the file transformation alone (--no-restart), read back with tomllib at the 2.x keys.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.skipif(shutil.which("containerd") is None or shutil.which("ctr") is None, reason="containerd")

HELPER = """
import os, signal, subprocess, sys, time
workdir = sys.argv[1]
pidfile = os.path.join(workdir, "containerd.pid")
if os.path.exists(pidfile):
    pid = int(open(pidfile).read())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            break
        if state == "Z":
            break
        time.sleep(0.05)
log = open(os.path.join(workdir, "containerd.log"), "ab")
child = subprocess.Popen(["containerd", "--config", os.path.join(workdir, "config.toml")],
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
open(pidfile, "w").write(str(child.pid))
"""


def user_config(workdir: Path) -> str:
    """A version 2 config as a user keeps it: comments, CRI on with legacy registry mirrors, another proxy plugin."""
    return f"""# containerd config of this node (hand-written)
version = 2
root = "{workdir}/root"
state = "{workdir}/state"
disabled_plugins = [
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
]

[grpc]
  address = "{workdir}/containerd.sock"   # private socket

[ttrpc]
  address = "{workdir}/containerd.sock.ttrpc"

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    # the CRI plugin, as kubelet uses it
    [plugins."io.containerd.grpc.v1.cri".containerd]
      default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{workdir}/cni/bin"
      conf_dir = "{workdir}/cni/net.d"
    [plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]
      endpoint = ["https://mirror.example.internal"]

[proxy_plugins]
  # another remote snapshotter stays
  [proxy_plugins.other]
    type = "snapshot"
    address = "{workdir}/other.sock"

[debug]
  level = "info"
"""


@pytest.fixture
def node(tmp_path):
    """A running containerd with the user's config; yields (workdir, config path, the liftoff argv tail)."""
    workdir = tmp_path
    for directory in ("cni/bin", "cni/net.d"):
        (workdir / directory).mkdir(parents=True)
    config = workdir / "config.toml"
    config.write_text(user_config(workdir))
    os.chmod(config, 0o640)
    helper = workdir / "restart.py"
    helper.write_text(HELPER)
    restart = f"{shlex.quote(sys.executable)} {shlex.quote(str(helper))} {shlex.quote(str(workdir))}"
    subprocess.run(["sh", "-c", restart], check=True)
    common = ["--containerd-config", str(config), "--restart-command", restart, "--timeout", "60"]
    yield workdir, config, common
    pid = int((workdir / "containerd.pid").read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def ctr_plugins(workdir: Path) -> dict[str, str]:
    out = subprocess.run(
        ["ctr", "--address", str(workdir / "containerd.sock"), "plugins", "ls"], capture_output=True, text=True, check=True
    ).stdout
    return {p[1]: p[-1] for p in (line.split() for line in out.splitlines()[1:]) if p[0] == "io.containerd.snapshotter.v1"}


def only_additions(old: str, new: str) -> list[str]:
    """The lines `new` adds to `old`; fails if any line of `old` is gone or changed."""
    import difflib

    diff = list(difflib.ndiff(old.splitlines(), new.splitlines()))
    assert not [d for d in diff if d.startswith("- ")], "\n".join(diff)
    return [d[2:] for d in diff if d.startswith("+ ")]


def test_install_and_uninstall_on_a_real_containerd(node):
    workdir, config, common = node
    original = config.read_text()
    done = run_cli("node", "install", *common, "--socket", str(workdir / "liftoff.sock"), "--json", timeout=180)
    result = json.loads(done.stdout)
    assert result["restarted"] and result["plugin"] == "ok" and result["version"] == 2
    assert any("mirrors" in note for note in result["notes"])  # containerd refuses config_path beside mirrors

    installed = config.read_text()
    added = only_additions(original, installed)
    assert all(
        "liftoff" in line
        or "disable_snapshot_annotations" in line
        or "discard_unpacked" in line
        or "type" in line
        or not line.strip()
        for line in added
    ), added
    parsed = tomllib.loads(installed)
    assert parsed["proxy_plugins"]["liftoff"] == {"type": "snapshot", "address": str(workdir / "liftoff.sock")}
    assert parsed["proxy_plugins"]["other"]["address"] == str(workdir / "other.sock")
    cri = parsed["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert (cri["snapshotter"], cri["disable_snapshot_annotations"], cri["discard_unpacked_layers"]) == ("liftoff", False, True)
    assert "config_path" not in parsed["plugins"]["io.containerd.grpc.v1.cri"]["registry"]
    assert oct(config.stat().st_mode & 0o777) == oct(0o640)
    assert (workdir / "config.toml.liftoff-backup").read_text() == original
    plugins = ctr_plugins(workdir)
    assert plugins["liftoff"] == "ok" and plugins["other"] == "ok"

    again = json.loads(run_cli("node", "install", *common, "--socket", str(workdir / "liftoff.sock"), "--json").stdout)
    assert (again["changed"], again["restarted"]) == (False, False)  # idempotent: nothing written, no restart
    assert (workdir / "config.toml.liftoff-backup").read_text() == original  # the backup is never overwritten

    done = run_cli("node", "uninstall", *common, timeout=180)
    assert "restored" in done.stdout
    assert config.read_text() == original
    assert "liftoff" not in ctr_plugins(workdir)
    assert not (workdir / "config.toml.liftoff-backup").exists()
    done = run_cli("node", "uninstall", *common)
    assert "nothing changed" in done.stdout and config.read_text() == original


def test_uninstall_after_a_user_edit_removes_only_liftoffs_keys(node):
    workdir, config, common = node
    original = config.read_text()
    run_cli("node", "install", *common, "--socket", str(workdir / "liftoff.sock"), "--no-restart")
    edited = config.read_text().replace('level = "info"', 'level = "debug"  # the user, after install')
    config.write_text(edited)
    done = run_cli("node", "uninstall", *common, timeout=180)
    assert "removed" in done.stdout
    assert config.read_text() == original.replace('level = "info"', 'level = "debug"  # the user, after install')
    assert "liftoff" not in ctr_plugins(workdir)


def test_containerd_that_does_not_come_back_with_the_plugin_gets_the_old_file(node):
    """A restart that leaves containerd on its old config (here: one that does nothing) fails the check, and the
    previous file is put back; a restart command that fails does the same."""
    _workdir, config, _common = node
    original = config.read_text()
    done = run_cli(
        "node", "install", "--containerd-config", str(config), "--restart-command", "true", "--timeout", "3", check=False
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert "did not come back as expected" in last and "does not list io.containerd.snapshotter.v1 liftoff" in last, last
    assert f"put the previous {config} back and restarted it" in last
    assert config.read_text() == original
    done = run_cli("node", "install", "--containerd-config", str(config), "--restart-command", "exit 7", check=False)
    assert done.returncode == 1 and "restarting containerd failed" in done.stderr and config.read_text() == original


def test_version_1_config_is_refused(tmp_path):
    config = tmp_path / "config.toml"
    text = '# version 1: no version key\n[plugins.cri]\n  sandbox_image = "pause"\n'
    config.write_text(text)
    done = run_cli("node", "install", "--containerd-config", str(config), "--no-restart", check=False)
    assert done.returncode == 1 and "version 1 format" in done.stderr and "Traceback" not in done.stderr
    assert config.read_text() == text and not (tmp_path / "config.toml.liftoff-backup").exists()
    done = run_cli("node", "install", "--containerd-config", str(config), "--json", check=False)
    assert json.loads(done.stdout)["error"]["exit"] == 1


def test_version_3_transformation(tmp_path):
    """containerd 2.x keys (file only: no containerd 2 here); --dry-run prints the diff and writes nothing."""
    config = tmp_path / "config.toml"
    text = (
        "version = 3\n# 2.x config\n[plugins]\n  [plugins.'io.containerd.cri.v1.images']\n    snapshotter = 'overlayfs'\n"
        "    max_concurrent_downloads = 3\n\n[proxy_plugins]\n  [proxy_plugins.other]\n    type = 'snapshot'\n"
        "    address = '/run/other.sock'\n"
    )
    config.write_text(text)
    dry = run_cli("node", "install", "--containerd-config", str(config), "--dry-run")
    assert "+    snapshotter = 'liftoff'" in dry.stdout and "-    snapshotter = 'overlayfs'" in dry.stdout
    assert config.read_text() == text
    run_cli("node", "install", "--containerd-config", str(config), "--no-restart")
    parsed = tomllib.loads(config.read_text())
    images = parsed["plugins"]["io.containerd.cri.v1.images"]
    assert (images["snapshotter"], images["discard_unpacked_layers"], images["max_concurrent_downloads"]) == ("liftoff", True, 3)
    assert images["registry"]["config_path"] == "/etc/containerd/certs.d"
    assert parsed["proxy_plugins"]["liftoff"]["type"] == "snapshot" and "other" in parsed["proxy_plugins"]
    assert "io.containerd.grpc.v1.cri" not in parsed["plugins"]
    run_cli("node", "uninstall", "--containerd-config", str(config), "--no-restart")
    assert config.read_text() == text


def test_the_daemonsets_installer_and_its_prestop_hook(node):
    """The DaemonSet's `install` container command and preStop hook, run against this containerd (paths moved to the
    fixture's, systemd replaced by the restart helper): install waits for the snapshotter's socket before touching
    containerd, installs, holds until SIGTERM; the hook restores the original config and containerd drops the plugin."""
    import socket
    import time

    from tests.test_deploy import named, pod_spec

    workdir, config, common = node
    original = config.read_text()
    install = next(c for c in pod_spec(named("DaemonSet", "liftoff-node"))["containers"] if c["name"] == "install")
    sock = str(workdir / "liftoff.sock")

    def local(argv: list[str]) -> list[str]:
        moved = {"/host/etc/containerd/config.toml": str(config), "/run/liftoff/snapshotter.sock": sock}
        return [moved.get(a, a) for a in argv] + common[2:]  # --restart-command HELPER --timeout 60

    assert install["command"] == ["liftoff"]
    holder = subprocess.Popen(
        [sys.executable, "-m", "liftoff", *local(install["args"])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(2)
        assert holder.poll() is None and config.read_text() == original  # waiting: nothing written, no restart
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(sock)
        listener.listen(16)
        line = holder.stderr.readline()
        while line and not line.startswith("holding"):
            line = holder.stderr.readline()
        assert line.startswith("holding"), holder.stderr.read()
        assert ctr_plugins(workdir)["liftoff"] == "ok"
        assert tomllib.loads(config.read_text())["proxy_plugins"]["liftoff"]["address"] == sock
        assert holder.poll() is None  # holds: the container lives as long as the install

        prestop = install["lifecycle"]["preStop"]["exec"]["command"]
        assert prestop[0] == "liftoff"
        done = run_cli(*local(prestop[1:]), timeout=180)
        assert "restored" in done.stdout and config.read_text() == original
        assert "liftoff" not in ctr_plugins(workdir)
        holder.send_signal(signal.SIGTERM)
        assert holder.wait(timeout=10) == 0
        assert "liftoff installed" in holder.stdout.read()
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait()


def test_install_waits_for_the_snapshotter_socket_and_gives_up(node):
    """Without a snapshotter serving, --wait-for-socket fails in one line and leaves containerd's config alone."""
    workdir, config, common = node
    original = config.read_text()
    sock = workdir / "nobody.sock"
    done = run_cli("node", "install", *common, "--socket", str(sock), "--wait-for-socket", "1", check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert f"{sock} did not accept connections within 1 s" in last and "containerd was left as it is" in last, last
    assert config.read_text() == original and not (workdir / "config.toml.liftoff-backup").exists()
