"""`liftoff pull` into Debian's containerd with the (ordinary) liftoff snapshotter: labels, run, idempotence,
indexes, concurrent pulls, image removal and GC, and one-line errors."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from liftoff.devstack.services import free_port
from snapshotter.containerd_api import ContainerdClient
from snapshotter.localnode import start_containerd
from tests.conftest import ROOT, run_cli
from tests.pull.conftest import start_stack
from tests.pull.helpers import (
    EXPECTED,
    GC,
    SCRIPT,
    SOURCE,
    blob_gets_after,
    content,
    labels,
    parents,
    pull,
    pull_error,
    run,
    snapshots,
)
from tests.snapshotter.helpers import SnapshotsClient


@pytest.fixture
def fresh(stack, tmp_path_factory):
    """A containerd of this test's own (its own content store) on the module's snapshotter."""
    daemon = start_containerd(tmp_path_factory.mktemp("containerd"), stack.snapshotter_socket)
    yield daemon
    daemon.stop()


def test_pull_applies_every_layer_labels_like_containerd_and_runs(stack, fresh, registry, app_image, ns):
    before = registry.blob_gets()
    result = pull(fresh.address, app_image.ref, ns)

    chain = app_image.chain_ids
    assert [layer["state"] for layer in result["layers"]] == ["applied"] * 3
    assert [layer["chain_id"] for layer in result["layers"]] == chain
    assert all(layer["fetched_bytes"] > 0 for layer in result["layers"])
    assert result["chain_id"] == chain[-1] and result["platform"] == "linux/amd64"
    assert result["manifest"] == result["target"] == app_image.target
    assert blob_gets_after(registry, before, 4) == 4  # the config and each layer, once

    assert run(fresh, ns, app_image.ref, SCRIPT) == EXPECTED
    assert snapshots(fresh, ns) == parents(chain)  # committed, no extract-* left
    assert fresh.ctr("leases", "ls", "-q", namespace=ns).strip() == ""  # the pull's lease is gone

    layers = [layer["digest"] for layer in result["layers"]]
    assert labels(fresh.address, ns, result["manifest"]) == {
        f"{GC}content.config": result["config"],
        **{f"{GC}content.l.{i}": digest for i, digest in enumerate(layers)},
        SOURCE: "liftoff-pull/app",
    }
    assert labels(fresh.address, ns, result["config"]) == {f"{GC}snapshot.liftoff": chain[-1], SOURCE: "liftoff-pull/app"}
    for layer, diff_id in zip(result["layers"], app_image.diff_ids, strict=True):
        assert labels(fresh.address, ns, layer["digest"]) == {"containerd.io/uncompressed": diff_id, SOURCE: "liftoff-pull/app"}
    with ContainerdClient(fresh.address, ns) as client:
        assert client.get_image(app_image.ref).target.digest == app_image.target

    # what the snapshotter itself was given: containerd passes the snapshot labels through to the backend
    backend = SnapshotsClient(stack.snapshotter_socket, namespace=None)
    try:
        by_chain = {info.name.rsplit("/", 1)[-1]: info for info in backend.list() if info.name.startswith(f"{ns}/")}
    finally:
        backend.close()
    for i, layer in enumerate(result["layers"]):
        got = dict(by_chain[chain[i]].labels)
        assert got["containerd.io/snapshot.ref"] == chain[i]
        assert got["containerd.io/snapshot/cri.layer-digest"] == layer["digest"]
        assert got["containerd.io/snapshot/cri.manifest-digest"] == result["manifest"]
        assert got["containerd.io/snapshot/cri.image-ref"] == app_image.ref
        assert got["containerd.io/snapshot/cri.image-layers"] == ",".join(layers[i:])


def test_pulling_twice_is_idempotent(fresh, registry, app_image, ns):
    first = pull(fresh.address, app_image.ref, ns)
    manifest_labels = labels(fresh.address, ns, first["manifest"])
    before = registry.blob_gets()

    second = pull(fresh.address, app_image.ref, ns)
    assert [layer["state"] for layer in second["layers"]] == ["present"] * 3
    assert [layer["fetched_bytes"] for layer in second["layers"]] == [0, 0, 0]
    assert {k: second[k] for k in ("target", "manifest", "config", "chain_id")} == {
        k: first[k] for k in ("target", "manifest", "config", "chain_id")
    }
    assert blob_gets_after(registry, before, 0) == 0  # config and layers come from containerd
    assert labels(fresh.address, ns, first["manifest"]) == manifest_labels
    assert len(snapshots(fresh, ns)) == 3
    assert fresh.ctr("leases", "ls", "-q", namespace=ns).strip() == ""
    assert run(fresh, ns, app_image.ref, "/app/run.sh") == "app says hi\n"

    text = run_cli("pull", app_image.ref, "--address", fresh.address, "--plain-http", "--namespace", ns).stdout
    lines = text.splitlines()
    assert [line.split()[:3] for line in lines[:3]] == [
        ["layer", f"{i}/3", d["digest"][:19]] for i, d in enumerate(first["layers"], 1)
    ]
    assert all(line.split()[3] == "present" for line in lines[:3])
    assert lines[3].startswith(f"pulled {app_image.ref} (linux/amd64, ") and "0 remote, 0 applied, 3 already present" in lines[3]


def test_index_pulls_the_requested_platform(stack, index_image, ns):
    amd64 = pull(stack.address, index_image.ref, ns)
    assert amd64["target"] == index_image.target
    assert amd64["manifest"] == index_image.manifests["linux/amd64"] and amd64["platform"] == "linux/amd64"
    assert amd64["chain_id"] == index_image.chains["linux/amd64"][-1]
    assert run(stack.containerd, ns, index_image.ref, "cat /etc/tag") == "amd64\n"
    assert labels(stack.address, ns, index_image.target) == {
        f"{GC}content.m.0": index_image.manifests["linux/amd64"],
        f"{GC}content.m.1": index_image.manifests["linux/arm64"],
        SOURCE: "liftoff-pull/multi",
    }

    arm64 = pull(stack.address, index_image.ref, ns, "--platform", "linux/arm64")
    assert arm64["manifest"] == index_image.manifests["linux/arm64"]
    assert [layer["state"] for layer in arm64["layers"]] == ["present", "applied"]  # the base layer is shared
    assert set(snapshots(stack.containerd, ns)) == {*index_image.chains["linux/amd64"], *index_image.chains["linux/arm64"]}

    common = ["--address", stack.address, "--plain-http", "--namespace", ns]
    error = pull_error(index_image.ref, *common, "--platform", "linux/s390x")
    assert "no manifest for platform linux/s390x" in error and "linux/amd64, linux/arm64" in error


def test_concurrent_pulls_of_one_image_both_succeed(stack, docker_image, ns):
    argv = [sys.executable, "-m", "liftoff", "pull", docker_image.ref, "--address", stack.address]
    argv += ["--plain-http", "--namespace", ns, "--json"]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    results = [json.loads(out) for out, _ in outputs]
    for result in results:
        assert result["chain_id"] == docker_image.chain_ids[-1]
        # a layer the other pull committed between our Stat and Prepare is answered ALREADY_EXISTS by containerd
        # itself (its target exists), which the pull reports like a remote layer
        assert {layer["state"] for layer in result["layers"]} <= {"applied", "present", "remote"}
    assert snapshots(stack.containerd, ns) == parents(docker_image.chain_ids)
    assert stack.containerd.ctr("leases", "ls", "-q", namespace=ns).strip() == ""
    assert run(stack.containerd, ns, docker_image.ref, "cat /etc/tag") == "docker\n"


def test_image_removal_and_gc_release_everything(stack, app_image, index_image, ns):
    app = pull(stack.address, app_image.ref, ns)
    multi = pull(stack.address, index_image.ref, ns)
    assert app["layers"][0]["chain_id"] == multi["layers"][0]["chain_id"]  # shared base layer

    stack.containerd.ctr("image", "rm", "--sync", index_image.ref, namespace=ns)
    assert snapshots(stack.containerd, ns) == parents(app_image.chain_ids)  # the app image's chain stays
    assert {index_image.target, multi["manifest"], multi["config"]}.isdisjoint(content(stack.containerd, ns))

    stack.containerd.ctr("image", "rm", "--sync", app_image.ref, namespace=ns)
    assert snapshots(stack.containerd, ns) == {}
    assert content(stack.containerd, ns) == set()
    backend = SnapshotsClient(stack.snapshotter_socket, namespace=None)
    try:
        assert [info.name for info in backend.list() if info.name.startswith(f"{ns}/")] == []
    finally:
        backend.close()


def test_errors_are_one_line(stack, registry, tmp_path, ns):
    common = ["--address", stack.address, "--plain-http", "--namespace", ns]
    error = pull_error(f"{registry.host}/liftoff-pull/no-such-image:v1", *common)
    assert "liftoff-pull/no-such-image:v1 not found" in error

    error = pull_error(f"127.0.0.1:{free_port()}/liftoff-pull/app:v1", *common)
    assert "is unreachable" in error

    error = pull_error(f"{registry.host}/liftoff-pull/app:v1", *common, "--snapshotter", "no-such-snapshotter")
    assert "has no snapshotter 'no-such-snapshotter'" in error and "proxy_plugins" in error

    missing = tmp_path / "containerd.sock"
    error = pull_error(f"{registry.host}/liftoff-pull/app:v1", "--address", str(missing))
    assert f"cannot reach containerd at {missing}: no such socket" in error

    with socket.socket(socket.AF_UNIX) as dead:  # a socket file nobody listens on: a containerd that died
        dead.bind(str(missing))
    error = pull_error(f"{registry.host}/liftoff-pull/app:v1", "--address", str(missing))
    assert "connection refused" in error
    assert stack.containerd.ctr("leases", "ls", "-q", namespace=ns).strip() == ""


def test_snapshotter_down_is_one_line(tmp_path_factory, registry, app_image, ns):
    down = start_stack(tmp_path_factory, "down-stack")
    try:
        down.snapshotter.stop()
        error = pull_error(app_image.ref, "--address", down.address, "--plain-http", "--namespace", ns)
        assert "containerd cannot reach snapshotter 'liftoff'" in error and "start it" in error
        assert down.containerd.ctr("leases", "ls", "-q", namespace=ns).strip() == ""
    finally:
        down.containerd.stop()
