"""liftoff's own image (scripts/image), for real: built reproducibly, small, labelled with its package
versions, and run the way the DaemonSets run it. The OCI layout is imported into a test containerd;
`liftoff fdholder`, `liftoff fused` and `liftoff snapshotter` run from it privileged, in the host's PID
namespace, with the state directories bind-mounted rshared at their host paths (Kubernetes'
Bidirectional propagation) and /dev/fuse; that same containerd then pulls an image lazily through
them (`liftoff pull` from this machine) and starts a container from it.

Slow: the first run builds the Debian root file system with debootstrap from the configured mirror
(about 70 s here; cached under /var/tmp/liftoff-image), each image build then takes about a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest

from liftoff.devstack.ocibuild import LayoutWriter
from liftoff.devstack.services import push_layout
from snapshotter.fuse_control import FusedClient
from snapshotter.localnode import start_containerd
from tests.conftest import ROOT
from tests.remote.conftest import IMAGE_CONFIG
from tests.remote.images import conformance_layers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

EPOCH = "1700000000"
SYSTEM_NS = "liftoff-system"


def build(output: Path, archive: Path | None = None) -> dict:
    argv = [str(ROOT / "scripts" / "image"), "--output", str(output)] + (["--archive", str(archive)] if archive else [])
    done = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, SOURCE_DATE_EPOCH=EPOCH), timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("image")
    return build(work / "oci", work / "liftoff.tar")


def blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def config_of(image: dict) -> dict:
    layout = Path(image["layout"])
    manifest = json.loads(blob(layout, image["digest"]))
    return json.loads(blob(layout, manifest["config"]["digest"]))


def test_building_twice_gives_the_same_digest(image, tmp_path):
    again = build(tmp_path / "oci")
    assert again["digest"] == image["digest"], (image["layers"], again["layers"])


def test_image_is_small_labelled_and_without_compilers(image):
    assert image["compressed_bytes"] < 120 * 2**20, image  # 79 MiB when written
    labels = config_of(image)["config"]["Labels"]
    debian = dict(entry.split("=", 1) for entry in labels["io.liftoff.packages.debian"].split())
    python = dict(entry.split("==", 1) for entry in labels["io.liftoff.packages.python"].split())
    assert {"python3", "util-linux", "ca-certificates"} <= set(debian)
    assert {"grpcio", "protobuf", "zstandard", "boto3", "prometheus-client"} <= set(python)
    assert not {"gcc", "cpp", "make", "libc6-dev", "python3-dev"} & set(debian)
    assert labels["org.opencontainers.image.version"]
    layout = Path(image["layout"])
    manifest = json.loads(blob(layout, image["digest"]))
    names: set[str] = set()
    for layer in manifest["layers"]:
        with tarfile.open(layout / "blobs" / "sha256" / layer["digest"].split(":", 1)[1]) as tar:
            for member in tar:
                names.add(member.name)
                assert member.mtime <= int(EPOCH), member.name
    assert {"usr/bin/python3", "usr/bin/nsenter", "usr/local/bin/liftoff", "opt/liftoff/lib/liftoff/cli.py"} <= names
    assert not any(n.startswith("usr/share/doc/") or n.startswith("usr/share/man/") for n in names)
    assert not any(n.startswith("var/lib/apt/lists/") and n.endswith("Packages") for n in names)


def test_daemonsets_serve_a_lazy_start_from_the_image(image, tmp_path, registry):
    """The node's daemons from the image serve this machine's (test) containerd."""
    work = tmp_path / "node"
    state, run, holder, store, logs = (work / d for d in ("state", "run", "fdholder", "store", "logs"))
    for d in (state, run, holder, store, logs):
        d.mkdir(parents=True)
    for d in (state, run):  # what the DaemonSet's private-state init container does
        d.chmod(0o700)
    # a node's / is shared (systemd); here it is private: make the state directory a shared mount of its own
    subprocess.run(["mount", "--bind", str(state), str(state)], check=True)
    subprocess.run(["mount", "--make-rshared", str(state)], check=True)
    socket_path = run / "snapshotter.sock"
    containerd = start_containerd(work / "containerd", socket_path)
    store_url = f"file://{store}"
    ctr = containerd.ctr
    started: list[str] = []
    try:
        ctr("images", "import", "--snapshotter", "overlayfs", image["archive"], namespace=SYSTEM_NS)
        assert image["name"] in ctr("images", "ls", "-q", namespace=SYSTEM_NS).split()

        def daemon(name: str, mounts: list[Path], argv: list[str]) -> None:
            # hostPID is left out: runc here fails to join /proc/1/ns/pid ("can't get final child's PID from pipe")
            opts = [
                "run",
                "-d",
                "--privileged",
                "--net-host",
                "--snapshotter",
                "overlayfs",
                "--log-uri",
                f"file://{logs}/{name}.log",
            ]
            for path in mounts:
                propagation = "rshared" if path == state else "rprivate"
                opts += ["--mount", f"type=bind,src={path},dst={path},options=rbind:rw:{propagation}"]
            if state in mounts:
                opts += ["--rootfs-propagation", "rshared"]
            ctr(*opts, image["name"], name, "liftoff", *argv, namespace=SYSTEM_NS)
            started.append(name)

        def wait_for(path: Path, name: str) -> None:
            deadline = time.monotonic() + 60
            while not path.exists():
                if time.monotonic() > deadline:
                    raise AssertionError(f"{name} never made {path}: {(logs / f'{name}.log').read_text()[-2000:]}")
                time.sleep(0.1)

        # as deploy/k8s/base/node: liftoff-fdholder, then liftoff-node's fused and snapshotter containers
        daemon("fdholder", [holder], ["fdholder", "--socket", str(holder / "fdholder.sock")])
        wait_for(holder / "fdholder.sock", "fdholder")
        remote = state / "snapshotter" / "remote"
        port = 19000 + os.getpid() % 1000
        fused_argv = [
            "--log-format",
            "json",
            "--log-level",
            "info",
            "fused",
            "--root",
            str(remote),
            "--store",
            store_url,
            "--fd-holder",
            str(holder / "fdholder.sock"),
            "--metrics-address",
            f"127.0.0.1:{port}",
        ]
        daemon("fused", [state, holder, store, Path("/dev/fuse")], fused_argv)
        wait_for(remote / "fused.sock", "fused")
        daemon(
            "snapshotter",
            [state, run, store],
            [
                "snapshotter",
                "--root",
                str(state / "snapshotter"),
                "--socket",
                str(socket_path),
                "--store",
                store_url,
                "--no-start-fused",
            ],
        )
        wait_for(socket_path, "snapshotter")
        # as on a node (liftoff node install, README's deployment step 4): containerd restarts once the snapshotter serves.
        # This containerd dialled the socket before it existed; gRPC's reconnect backoff (up to minutes) would
        # then decide when the proxy plugin works. The daemons' tasks outlive the restart (their shims stay).
        containerd.stop()
        containerd = start_containerd(work / "containerd", socket_path)
        ctr = containerd.ctr

        # CI converts the image into the store; the node pulls it lazily and starts it
        layout = tmp_path / "workload"
        writer = LayoutWriter(layout)
        writer.tag(writer.add_image(conformance_layers(), config=IMAGE_CONFIG), "v1")
        ref = push_layout(layout, "v1", registry.host, "image-test/workload")
        liftoff = [sys.executable, "-m", "liftoff"]
        done = subprocess.run([*liftoff, "convert", ref, "--plain-http", "--store", store_url], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        done = subprocess.run(
            [*liftoff, "pull", ref, "--address", containerd.address, "--plain-http", "--json"], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr + containerd.log()[-2000:]
        assert [layer["state"] for layer in json.loads(done.stdout)["layers"]] == ["remote"] * 3
        out = ctr("run", "--rm", "--snapshotter", "liftoff", ref, "lazy-from-image", "/app/run.sh")
        assert out.startswith("lazily started"), out
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        assert f'liftoff_fused_chunk_fetches_total{{store="{store_url}"}}' in metrics
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            assert response.status == 200
        entries = [json.loads(line) for line in (logs / "fused.log").read_text().splitlines() if line.startswith("{")]
        assert any("serving" in e["message"] for e in entries)  # --log-format json: one object a line
    finally:
        if (state / "snapshotter" / "remote" / "fused.sock").exists():
            try:
                FusedClient(state / "snapshotter" / "remote" / "fused.sock").shutdown(15)  # unmounts the views
            except Exception as e:  # report below; the rest must still be cleaned up
                print(f"fused shutdown: {e}")
        for name in reversed(started):
            ctr("task", "kill", "-s", "SIGKILL", name, namespace=SYSTEM_NS, check=False)
            for _ in range(50):
                if "STOPPED" in ctr("task", "ls", namespace=SYSTEM_NS, check=False).split(name, 1)[-1].split("\n", 1)[0]:
                    break
                time.sleep(0.1)
            ctr("task", "delete", "-f", name, namespace=SYSTEM_NS, check=False)
            ctr("container", "delete", name, namespace=SYSTEM_NS, check=False)
        containerd.stop()
        subprocess.run(["umount", "-R", "-l", str(state)], check=False)
