"""Real clients through the proxy: skopeo copies single images and multi-platform indexes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from liftoff.devstack.ocibuild import LayoutWriter, Member, make_tar
from liftoff.devstack.services import push_layout
from tests.proxy.helpers import digest_of, registry_gets


def skopeo_copy(source: str, destination: str, *extra: str) -> subprocess.CompletedProcess:
    argv = ["skopeo", "copy", "--quiet", "--src-tls-verify=false", *extra, source, destination]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def layout_blobs(layout: Path) -> dict[str, bytes]:
    return {f"sha256:{p.name}": p.read_bytes() for p in (layout / "blobs" / "sha256").iterdir()}


def test_skopeo_copy_through_the_proxy(proxy, image, tmp_path, registry):
    done = skopeo_copy(
        f"docker://{proxy.host}/{image.repository}:{image.tag}", f"oci:{tmp_path / 'out'}:{image.tag}", "--preserve-digests"
    )
    assert done.returncode == 0, done.stderr
    copied = layout_blobs(tmp_path / "out")
    for digest, data in image.blobs.items():
        assert copied[digest] == data and digest_of(data) == digest
    assert copied[image.manifest_digest] == image.manifest
    gets = {d: registry_gets(registry, d) for d in image.blobs}
    again = skopeo_copy(f"docker://{proxy.host}/{image.repository}:{image.tag}", f"oci:{tmp_path / 'again'}:{image.tag}")
    assert again.returncode == 0, again.stderr
    assert {d: registry_gets(registry, d) for d in image.blobs} == gets  # the second copy came from the cache


def test_skopeo_copies_a_multi_platform_index(proxy, registry, tmp_path):
    layout = tmp_path / "multi"
    writer = LayoutWriter(layout)
    descriptors = [
        writer.add_image([make_tar([Member("arch", data=arch.encode())])], platform=("linux", arch))
        for arch in ("amd64", "arm64")
    ]
    index = writer.add_index(descriptors)
    writer.tag(index, "v1")
    push_layout(layout, "v1", registry.host, "proxy-test/multi")
    done = skopeo_copy(f"docker://{proxy.host}/proxy-test/multi:v1", f"oci:{tmp_path / 'out'}:v1", "--all", "--preserve-digests")
    assert done.returncode == 0, done.stderr
    out_index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert out_index["manifests"][0]["digest"] == index["digest"]
    assert set(layout_blobs(layout)) <= set(layout_blobs(tmp_path / "out"))
