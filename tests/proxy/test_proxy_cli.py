"""`liftoff proxy config` (containerd's hosts.toml) and the one-line errors of `liftoff proxy`."""

from __future__ import annotations

import socket
import tomllib

import pytest

from tests.conftest import run_cli


def test_config_prints_a_hosts_toml_per_upstream():
    out = run_cli(
        "proxy", "config", "--proxy-url", "http://10.0.0.5:5050",
        "--upstream", "docker.io=https://registry-1.docker.io",
        "--upstream", "127.0.0.1:5000=http://127.0.0.1:5000", "--plain-http", "127.0.0.1:5000",
    ).stdout  # fmt: skip
    sections = out.split("# ---- certs.d/")[1:]
    assert [s.split("/hosts.toml", 1)[0] for s in sections] == ["docker.io", "127.0.0.1:5000"]
    hub = tomllib.loads(sections[0].split("\n", 1)[1])
    assert hub == {
        "server": "https://registry-1.docker.io",
        "host": {"http://10.0.0.5:5050": {"capabilities": ["pull", "resolve"]}},
    }
    local = tomllib.loads(sections[1].split("\n", 1)[1])
    assert local["server"] == "http://127.0.0.1:5000"


def test_config_writes_a_hosts_dir(tmp_path):
    run_cli(
        "proxy", "config", "--proxy-url", "https://proxy.internal:5050/", "--ca-file", "/etc/liftoff/ca.pem",
        "--upstream", "ghcr.io=https://ghcr.io", "--hosts-dir", str(tmp_path),
    )  # fmt: skip
    config = tomllib.loads((tmp_path / "ghcr.io" / "hosts.toml").read_text())
    assert config["host"]["https://proxy.internal:5050"] == {"capabilities": ["pull", "resolve"], "ca": "/etc/liftoff/ca.pem"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "no upstream registry: pass --upstream"),
        (["--upstream", "docker.io"], "expected NAME=URL"),
        (["--upstream", "127.0.0.1:5000=http://127.0.0.1:5000"], "pass --plain-http 127.0.0.1:5000"),
        (["--upstream", "Bad_Host!=https://x"], "not a registry host name"),
        (["--upstream", "docker.io=https://registry-1.docker.io/v2/"], "no path"),
        (["--upstream", "a.io=https://a.io", "--upstream", "a.io=https://b.io"], "given twice"),
        (["--upstream", "a.io=https://a.io", "--pass-credentials", "b.io"], "--pass-credentials b.io: no such --upstream"),
        (["--upstream", "a.io=https://a.io", "--default-upstream", "b.io"], "--default-upstream b.io: no such --upstream"),
        (["--upstream", "a.io=https://a.io", "--listen", "nowhere"], "bad --listen"),
        (["--upstream", "a.io=https://a.io", "--convert-workers", "0"], "--convert-workers must be at least 1"),
        (
            ["--upstream", "a.io=https://a.io", "--cache-dir", "/proc/liftoff-proxy"],
            "cannot create --cache-dir /proc/liftoff-proxy",
        ),
    ],
)
def test_bad_options_fail_with_one_line_naming_the_fix(args, message, tmp_path):
    if "--cache-dir" not in args:
        args = [*args, "--cache-dir", str(tmp_path / "cache")]
    done = run_cli("proxy", *args, check=False, timeout=30)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr


def test_a_busy_listen_address_is_a_clear_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_cli(
            "proxy", "--upstream", "a.io=https://a.io", "--listen", f"127.0.0.1:{port}", "--cache-dir", str(tmp_path),
            check=False, timeout=30,
        )  # fmt: skip
    assert done.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in done.stderr, done.stderr
