"""The Kubernetes path: a CRI PullImage (what kubelet calls) through containerd's CRI plugin configured with
`snapshotter = "liftoff"` and default snapshot annotations, driven by liftoff's CRI client; and an image
`liftoff pull` put in the k8s.io namespace, as CRI sees it."""

from __future__ import annotations

import time
import uuid

import pytest

from snapshotter.cri import CRIImageClient
from tests.pull.conftest import start_stack
from tests.pull.helpers import EXPECTED, SCRIPT, parents, pull, snapshots
from tests.snapshotter.helpers import SnapshotsClient

K8S = "k8s.io"  # the namespace CRI keeps its images in


@pytest.fixture(scope="module")
def cri_stack(tmp_path_factory):
    """containerd with the CRI plugin on, unpacking with the liftoff snapshotter."""
    started = start_stack(tmp_path_factory, "cri-stack", cri=True)
    yield started
    started.containerd.stop()
    started.snapshotter.stop()


@pytest.fixture
def cri(cri_stack) -> CRIImageClient:
    client = CRIImageClient(cri_stack.address)
    client.wait_ready()
    yield client
    client.close()


def backend_labels(stack, chain_id: str) -> dict[str, str]:
    """The labels the snapshotter stored for a committed k8s.io snapshot named `chain_id`."""
    backend = SnapshotsClient(stack.snapshotter_socket, namespace=None)
    try:
        found = [i for i in backend.list() if i.name.startswith(f"{K8S}/") and i.name.endswith(f"/{chain_id}")]
    finally:
        backend.close()
    assert len(found) == 1, found
    return dict(found[0].labels)


def test_cri_pull_unpacks_with_liftoff_and_runs(cri_stack, cri, app_image):
    image_id = cri.pull(app_image.ref)
    status = cri.status(app_image.ref)
    assert status is not None and status.id == image_id
    assert app_image.ref in status.repo_tags

    chain = app_image.chain_ids
    assert snapshots(cri_stack.containerd, K8S) == parents(chain)
    # the pull-time unpacker's handshake label reaches the snapshotter; with disable_snapshot_annotations = true
    # (containerd's default) the cri.* labels do not
    for chain_id in chain:
        labels = backend_labels(cri_stack, chain_id)
        assert labels["containerd.io/snapshot.ref"] == chain_id
        assert not [key for key in labels if key.startswith("containerd.io/snapshot/cri.")]

    container = f"cri-test-{uuid.uuid4().hex[:8]}"
    argv = ["run", "--rm", "--snapshotter", "liftoff", app_image.ref, container, "/bin/sh", "-c", SCRIPT]
    assert cri_stack.containerd.ctr(*argv, namespace=K8S) == EXPECTED

    cri.remove(app_image.ref)
    assert cri.status(app_image.ref) is None
    assert cri.status(image_id) is None
    assert snapshots(cri_stack.containerd, K8S) == {}  # CRI removes the last reference with a synchronous GC


def test_liftoff_pull_into_k8s_namespace_is_an_image_cri_knows(cri_stack, cri, index_image):
    result = pull(cri_stack.address, index_image.ref, K8S)
    deadline = time.monotonic() + 10
    while (status := cri.status(index_image.ref)) is None and time.monotonic() < deadline:
        time.sleep(0.1)  # CRI learns of images created through containerd's API from its event stream
    assert status is not None, "CRI never listed the image liftoff pull created in k8s.io"
    assert status.id == result["config"]
    assert index_image.ref in status.repo_tags

    cri.remove(index_image.ref)
    assert cri.status(index_image.ref) is None
    assert snapshots(cri_stack.containerd, K8S) == {}
