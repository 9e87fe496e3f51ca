"""Fixtures for the `liftoff pull` and CRI tests: a `liftoff snapshotter` process, Debian's containerd using it
(a second one with the CRI plugin on), and busybox images in the session registry. Everything is real."""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from layerstore.digests import chain_ids
from layerstore.procs import Service
from liftoff.devstack.ocibuild import LayoutWriter
from liftoff.devstack.services import push_layout
from snapshotter.localnode import Containerd, start_containerd, start_snapshotter
from tests.snapshotter.helpers import BUSYBOX, app_layers, diff_id, small_layers

IMAGE_CONFIG = {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]}


@dataclass
class PushedImage:
    """An image in the session registry: its reference and, per platform, the manifest and layer chain."""

    ref: str
    repository: str
    manifests: dict[str, str] = field(default_factory=dict)  # "linux/amd64" -> manifest digest
    chains: dict[str, list[str]] = field(default_factory=dict)  # "linux/amd64" -> chain IDs, bottom-up
    diff_ids: list[str] = field(default_factory=list)  # of the linux/amd64 image
    target: str = ""  # the digest the reference resolves to (index or manifest)

    @property
    def chain_ids(self) -> list[str]:
        return self.chains["linux/amd64"]


@dataclass
class Stack:
    """A snapshotter process and the containerd that uses it as `liftoff`."""

    snapshotter: Service
    containerd: Containerd

    @property
    def address(self) -> str:
        return self.containerd.address

    @property
    def snapshotter_socket(self) -> Path:
        return self.snapshotter.extra["socket"]


@pytest.fixture(scope="session", autouse=True)
def _needs() -> None:
    if os.geteuid() != 0:
        pytest.fail("containerd and its mounts need root: run these tests as root")
    for tool in ("containerd", "ctr", "runc", "containerd-shim-runc-v2", "skopeo"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is not installed (scripts/bootstrap installs it)")
    if not BUSYBOX.exists():
        pytest.fail("these tests run containers from busybox: apt-get install busybox-static (scripts/bootstrap does)")


def start_stack(tmp_path_factory, name: str, cri: bool = False) -> Stack:
    """A snapshotter, then containerd (the snapshotter must be up first)."""
    workdir = tmp_path_factory.mktemp(name)
    snapshotter = start_snapshotter(workdir / "snapshotter" / "root", workdir / "snapshotter" / "run" / "liftoff.sock")
    try:
        containerd = start_containerd(workdir / "containerd", snapshotter.extra["socket"], cri=cri)
    except BaseException:
        snapshotter.stop()
        raise
    return Stack(snapshotter, containerd)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Stack:
    """containerd (CRI off) with the ordinary liftoff snapshotter."""
    started = start_stack(tmp_path_factory, "pull-stack")
    yield started
    started.containerd.stop()
    started.snapshotter.stop()


@pytest.fixture
def ns() -> str:
    """A containerd namespace of this test's own."""
    return f"pull-{uuid.uuid4().hex[:8]}"


def _push(tmp_path_factory, registry, repository: str, images: dict[str, list[bytes]], docker: bool = False) -> PushedImage:
    """Push one image, or an index when `images` names several platforms."""
    writer = LayoutWriter(tmp_path_factory.mktemp("layout"))
    pushed = PushedImage("", repository)
    descriptors = []
    for platform, layers in images.items():
        os_name, arch = platform.split("/")
        desc = writer.add_image(layers, config=IMAGE_CONFIG, platform=(os_name, arch))
        descriptors.append(desc)
        pushed.manifests[platform] = desc["digest"]
        pushed.chains[platform] = chain_ids([diff_id(tar) for tar in layers])
        if platform == "linux/amd64":
            pushed.diff_ids = [diff_id(tar) for tar in layers]
    top = descriptors[0] if len(descriptors) == 1 else writer.add_index(descriptors)
    pushed.target = top["digest"]
    writer.tag(top, "v1")
    pushed.ref = push_layout(writer.root, "v1", registry.host, repository, docker_format=docker)
    if docker:  # skopeo re-serializes a v2s2 manifest: its digest is the registry's, not the layout's
        pushed.manifests, pushed.target = {}, ""
    return pushed


@pytest.fixture(scope="session")
def app_image(registry, tmp_path_factory) -> PushedImage:
    """Three layers on a busybox base: whiteouts, an opaque dir, links, xattrs, a fifo, a device node."""
    return _push(tmp_path_factory, registry, "liftoff-pull/app", {"linux/amd64": app_layers()})


@pytest.fixture(scope="session")
def index_image(registry, tmp_path_factory) -> PushedImage:
    """An index: linux/amd64 and linux/arm64 images, each busybox plus a file naming its platform."""
    platforms = {"linux/amd64": small_layers("amd64"), "linux/arm64": small_layers("arm64")}
    return _push(tmp_path_factory, registry, "liftoff-pull/multi", platforms)


@pytest.fixture(scope="session")
def docker_image(registry, tmp_path_factory) -> PushedImage:
    """Two layers in Docker v2 schema 2 format (docker media types)."""
    return _push(tmp_path_factory, registry, "liftoff-pull/docker", {"linux/amd64": small_layers("docker")}, docker=True)
