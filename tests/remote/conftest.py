"""Fixtures for lazy remote layers: a converted image in a store, a snapshotter with --store
(and its FUSE daemon), containerd using it, and containerd's own overlayfs as the reference."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from layerstore.procs import Service
from liftoff.devstack.ocibuild import LayoutWriter
from liftoff.devstack.services import push_layout
from snapshotter.fuse_control import FusedClient
from snapshotter.localnode import Containerd, start_containerd, start_fused, start_snapshotter
from tests.conftest import ROOT
from tests.remote.images import conformance_layers
from tests.snapshotter.helpers import SnapshotsClient, chain_ids, diff_id

IMAGE_CONFIG = {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]}


@dataclass
class Image:
    ref: str
    layout: Path
    layers: list[bytes]
    diff_ids: list[str]
    chain_ids: list[str]
    manifest_digest: str


def build_image(tmp_path_factory, registry, name: str, layers: list[bytes], compression="gzip") -> Image:
    layout = tmp_path_factory.mktemp(f"layout-{name}")
    writer = LayoutWriter(layout)
    descriptor = writer.add_image(layers, config=IMAGE_CONFIG, compression=compression)
    writer.tag(descriptor, "v1")
    ref = push_layout(layout, "v1", registry.host, f"remote-test/{name}")
    ids = [diff_id(t) for t in layers]
    return Image(ref, layout, layers, ids, chain_ids(ids), descriptor["digest"])


def convert(image: Image, store_url: str, *extra: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "liftoff", "convert", image.ref, "--plain-http", "--store", store_url, "--json", *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@dataclass
class Stack:
    """A snapshotter with remote layers, its FUSE daemon, and containerd using it."""

    workdir: Path
    store_url: str
    snapshotter: Service
    containerd: Containerd

    @property
    def root(self) -> Path:
        return self.workdir / "root"

    @property
    def socket(self) -> Path:
        return self.workdir / "run" / "snapshotter.sock"

    def fused(self) -> FusedClient:
        return FusedClient(self.root / "remote" / "fused.sock")

    def restart_snapshotter(self, kill: bool = False) -> None:
        if kill:
            self.snapshotter.process.kill()
            self.snapshotter.process.wait()
        else:
            self.snapshotter.stop()
        self.snapshotter = start_snapshotter(self.root, self.socket, workdir=self.workdir, extra_args=["--store", self.store_url])
        self.wait_reconnected()

    def wait_reconnected(self, timeout: float = 30.0) -> None:
        """Wait until containerd reaches the restarted snapshotter (its gRPC client reconnects with backoff)."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            done = subprocess.run(
                ["ctr", "--address", self.containerd.address, "snapshot", "--snapshotter", "liftoff", "ls"],
                capture_output=True,
                text=True,
            )
            if done.returncode == 0 or time.monotonic() > deadline:
                return
            time.sleep(0.2)

    def api(self, namespace: str = "default") -> SnapshotsClient:
        """containerd's Snapshots API (through containerd, as pulls use it) for the liftoff snapshotter."""
        return SnapshotsClient(Path(self.containerd.address), namespace)

    def stop(self) -> None:
        self.containerd.stop()
        self.snapshotter.stop()
        stop_fused(self.fused())


def stop_fused(client: FusedClient, timeout: float = 10.0) -> None:
    """Ask the FUSE daemon to exit and wait until it stops answering."""
    client.shutdown(timeout)


def start_stack(workdir: Path, store_url: str, *extra: str, cri: bool = False, fused_args: list[str] | None = None) -> Stack:
    """A snapshotter with remote layers from `store_url` (it starts its FUSE daemon, unless `fused_args`
    are given: then the daemon is started first with them, as its systemd unit would), then containerd."""
    socket = workdir / "run" / "snapshotter.sock"
    if fused_args is not None:
        start_fused(workdir / "root" / "remote", ["--store", store_url, *fused_args], workdir=workdir)
        extra = (*extra, "--no-start-fused")
    snap = start_snapshotter(workdir / "root", socket, workdir=workdir, extra_args=["--store", store_url, *extra])
    ctd = start_containerd(workdir / "containerd", socket, cri=cri)
    return Stack(workdir, store_url, snap, ctd)


def liftoff_pull(stack: Stack, ref: str, namespace: str = "default") -> dict:
    """`liftoff pull` into the stack's containerd; the --json result."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "liftoff",
            "pull",
            ref,
            "--address",
            stack.containerd.address,
            "--plain-http",
            "--snapshotter",
            "liftoff",
            "--namespace",
            namespace,
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="session")
def conformance_image(registry, tmp_path_factory) -> Image:
    return build_image(tmp_path_factory, registry, "conformance", conformance_layers())


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    return f"file://{tmp_path_factory.mktemp('store')}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, store_url) -> Stack:
    s = start_stack(tmp_path_factory.mktemp("stack"), store_url)
    yield s
    s.stop()


@pytest.fixture(scope="module", params=["no-passthrough", "passthrough", "erofs"])
def data_path_stack(request, tmp_path_factory, store_url) -> Stack:
    """The module's stack (every read through the daemon: the default, and the path of kernels before 6.9),
    then one whose daemon runs with --passthrough (FUSE passthrough of whole local files, 6.9+), then one
    with --erofs (views as EROFS images over a FUSE blob, 6.12+; older kernels fall back to FUSE views)."""
    if request.param == "no-passthrough":
        yield request.getfixturevalue("stack")
        return
    s = start_stack(tmp_path_factory.mktemp(f"stack-{request.param}"), store_url, fused_args=[f"--{request.param}"])
    yield s
    s.stop()
