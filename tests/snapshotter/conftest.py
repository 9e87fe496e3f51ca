"""Fixtures for the snapshotter tests: a `liftoff snapshotter` process, Debian's containerd using it,
and test images in the session registry. Everything is real: processes, sockets, mounts, runc."""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from layerstore.procs import Service
from liftoff.devstack.ocibuild import LayoutWriter
from liftoff.devstack.services import free_port, push_layout
from snapshotter.localnode import Containerd, start_containerd, start_snapshotter
from tests.snapshotter.helpers import BUSYBOX, SnapshotsClient, app_layers, chain_ids, diff_id, small_layers

IMAGE_CONFIG = {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]}


@dataclass
class TestImage:
    """An image pushed to the session registry, with what containerd will name its layers."""

    ref: str
    layers: list[bytes]
    diff_ids: list[str] = field(default_factory=list)
    chain_ids: list[str] = field(default_factory=list)


@dataclass
class SnapshotterProcess:
    """A `liftoff snapshotter` child process that tests can stop, kill and start again on the same root."""

    root: Path
    socket: Path
    workdir: Path
    metrics_port: int | None = None
    service: Service | None = None

    def start(self) -> None:
        metrics = f"127.0.0.1:{self.metrics_port}" if self.metrics_port else None
        self.service = start_snapshotter(self.root, self.socket, workdir=self.workdir, metrics=metrics)

    def stop(self) -> int:
        assert self.service is not None
        self.service.stop()
        return self.service.process.returncode

    def kill(self) -> None:
        assert self.service is not None
        self.service.process.kill()
        self.service.process.wait()

    def log(self) -> str:
        return self.service.log() if self.service else ""

    def client(self, namespace: str | None = "test") -> SnapshotsClient:
        return SnapshotsClient(self.socket, namespace)


def _new_snapshotter(tmp_path_factory, name: str, metrics: bool = False) -> SnapshotterProcess:
    workdir = tmp_path_factory.mktemp(name)
    proc = SnapshotterProcess(workdir / "root", workdir / "run" / "snapshotter.sock", workdir)
    proc.metrics_port = free_port() if metrics else None
    proc.start()
    return proc


@pytest.fixture(scope="session", autouse=True)
def _busybox() -> None:
    if not BUSYBOX.exists():
        pytest.fail("these tests run containers from busybox: apt-get install busybox-static (scripts/bootstrap does)")


@pytest.fixture(scope="module")
def snapshotter(tmp_path_factory) -> SnapshotterProcess:
    """A snapshotter process of this module's own (metrics on a loopback port)."""
    proc = _new_snapshotter(tmp_path_factory, "snapshotter", metrics=True)
    yield proc
    if proc.service is not None:
        proc.service.stop()


@pytest.fixture
def fresh_snapshotter(tmp_path_factory) -> SnapshotterProcess:
    """A snapshotter process for one test (crash and restart tests)."""
    proc = _new_snapshotter(tmp_path_factory, "fresh-snapshotter")
    yield proc
    if proc.service is not None:
        proc.service.stop()


@pytest.fixture
def api(snapshotter) -> SnapshotsClient:
    """A client of the module's snapshotter in a namespace of this test's own."""
    client = snapshotter.client(f"t{uuid.uuid4().hex[:10]}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def containerd(snapshotter, tmp_path_factory) -> Containerd:
    """Debian's containerd with `liftoff` as a proxy snapshotter (started after the snapshotter)."""
    if os.geteuid() != 0:
        pytest.fail("containerd and its mounts need root: run these tests as root")
    for tool in ("containerd", "ctr", "runc", "containerd-shim-runc-v2"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is not installed: apt-get install containerd runc (scripts/bootstrap does)")
    daemon = start_containerd(tmp_path_factory.mktemp("containerd"), snapshotter.socket)
    yield daemon
    daemon.stop()


def _push(tmp_path_factory, registry, name: str, layers: list[bytes]) -> TestImage:
    layout_dir = tmp_path_factory.mktemp(f"layout-{name}")
    writer = LayoutWriter(layout_dir)
    writer.tag(writer.add_image(layers, config=IMAGE_CONFIG), "v1")
    ref = push_layout(layout_dir, "v1", registry.host, f"liftoff-test/{name}")
    ids = [diff_id(t) for t in layers]
    return TestImage(ref, layers, ids, chain_ids(ids))


@pytest.fixture(scope="session")
def app_image(registry, tmp_path_factory) -> TestImage:
    """Three layers with whiteouts, an opaque directory, hard and symbolic links, xattrs, a fifo, a device."""
    return _push(tmp_path_factory, registry, "app", app_layers())


@pytest.fixture(scope="session")
def small_image(registry, tmp_path_factory) -> TestImage:
    """Two layers; its base layer is the app image's base layer (shared snapshot)."""
    return _push(tmp_path_factory, registry, "small", small_layers("small"))
