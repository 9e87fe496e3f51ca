"""The Kubernetes path: a CRI PullImage (what kubelet calls) with containerd's CRI plugin set to
`snapshotter = "liftoff"` and default settings pulls a converted image lazily."""

from __future__ import annotations

import pytest

from snapshotter.cri import CRIImageClient
from tests.remote.conftest import convert, start_stack

K8S = "k8s.io"


@pytest.fixture(scope="module")
def cri_stack(tmp_path_factory, store_url):
    s = start_stack(tmp_path_factory.mktemp("cri"), store_url, cri=True)
    yield s
    s.stop()


def test_cri_pull_is_lazy_and_runs(cri_stack, conformance_image, registry):
    convert(conformance_image, cri_stack.store_url)
    client = CRIImageClient(cri_stack.containerd.address)
    try:
        client.wait_ready()
        before = registry.blob_gets()
        client.pull(conformance_image.ref)
        assert registry.blob_gets() - before == 1  # the config; no layer blob
    finally:
        client.close()
    # disable_snapshot_annotations = true: only the ref label arrives; the chain records find the layers
    remote = [
        line
        for line in cri_stack.containerd.ctr("snapshot", "--snapshotter", "liftoff", "ls", namespace=K8S).splitlines()
        if "Committed" in line
    ]
    assert len(remote) == 3
    out = cri_stack.containerd.ctr(
        "run", "--rm", "--snapshotter", "liftoff", conformance_image.ref, "k8s-lazy", "/app/run.sh", namespace=K8S
    )
    assert out.startswith("lazily started")
