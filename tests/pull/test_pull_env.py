"""`liftoff pull` finds containerd and its namespace as ctr and nerdctl do: $CONTAINERD_ADDRESS and
$CONTAINERD_NAMESPACE when the flags are not given; the flags win over the environment."""

from __future__ import annotations

import json

import pytest

from snapshotter.localnode import start_containerd
from tests.conftest import run_cli


@pytest.fixture
def fresh(stack, tmp_path_factory):
    daemon = start_containerd(tmp_path_factory.mktemp("containerd-env"), stack.snapshotter_socket)
    yield daemon
    daemon.stop()


def test_pull_takes_address_and_namespace_from_the_environment(fresh, app_image, ns):
    env = {"CONTAINERD_ADDRESS": fresh.address, "CONTAINERD_NAMESPACE": ns}
    result = json.loads(run_cli("pull", app_image.ref, "--plain-http", "--json", env=env).stdout)
    assert result["namespace"] == ns
    assert app_image.ref in fresh.ctr("images", "ls", "-q", namespace=ns).split()
    assert app_image.ref not in fresh.ctr("images", "ls", "-q").split()  # not in "default"

    flags = f"{ns}-flag"
    wrong = {"CONTAINERD_ADDRESS": "/nonexistent/containerd.sock", "CONTAINERD_NAMESPACE": ns}
    done = run_cli("pull", app_image.ref, "--plain-http", "--json", "--address", fresh.address, "--namespace", flags, env=wrong)
    assert json.loads(done.stdout)["namespace"] == flags
    assert app_image.ref in fresh.ctr("images", "ls", "-q", namespace=flags).split()
