"""End to end: containerd pulls through the proxy with nothing but a hosts.toml, the proxy converts the
image on that first pull, and the next pull (liftoff pull through the proxy) is lazy: no layer blob is
fetched, from the registry or from the proxy, and the container runs from the snapshotter's FUSE views."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli
from tests.proxy.helpers import registry_gets, start_proxy
from tests.remote.conftest import build_image, liftoff_pull, start_stack
from tests.remote.images import conformance_layers

RUN = ["/app/run.sh"]
EXPECTED = "lazily started\nNAME=liftoff-test\nVERSION=2\n"


def image_layer_digests(image) -> list[str]:
    """The layer digests of a tests.remote image, from its layout."""
    layout = image.layout / "blobs" / "sha256"
    manifest = json.loads((layout / image.manifest_digest.split(":")[1]).read_text())
    return [layer["digest"] for layer in manifest["layers"]]


def _registry_lines(registry) -> list[str]:
    return [line for line in registry.service.log().splitlines() if '"GET /v2/' in line or '"HEAD /v2/' in line]


@pytest.mark.timeout(300)
def test_containerd_pulls_through_the_proxy_then_the_converted_image_runs_lazily(registry, tmp_path_factory):
    image = build_image(tmp_path_factory, registry, "proxy-e2e", conformance_layers())
    workdir = tmp_path_factory.mktemp("e2e")
    store = f"file://{workdir / 'store'}"
    upstream = f"{registry.host}=http://{registry.host}"
    proxy = start_proxy(workdir / "proxy", [(registry.host, f"http://{registry.host}")], "--store", store)
    hosts_dir = workdir / "certs.d"
    run_cli(
        "proxy",
        "config",
        "--proxy-url",
        proxy.url,
        "--upstream",
        upstream,
        "--plain-http",
        registry.host,
        "--hosts-dir",
        str(hosts_dir),
    )
    assert (hosts_dir / registry.host / "hosts.toml").is_file()
    stack = start_stack(workdir / "stack", store)
    try:
        seen = len(_registry_lines(registry))
        layer_gets = {d: registry_gets(registry, d) for d in image_layer_digests(image)}
        # 1. an ordinary containerd pull, configured only by hosts.toml: every request goes through the proxy
        stack.containerd.ctr("image", "pull", "--hosts-dir", str(hosts_dir), image.ref)
        direct = [line for line in _registry_lines(registry)[seen:] if "containerd/" in line]
        assert direct == [], direct  # containerd never fell back to the registry itself
        ns = f"ns={registry.host.replace(':', '%3A')}"
        mirrored = [line for line in proxy.access() if ns in line and "by=converter" not in line]
        assert any("kind=manifest" in line for line in mirrored) and any("kind=blob" in line for line in mirrored)
        # 2. the first pull queued the conversion; it completes
        job = proxy.wait_job(image.manifest_digest, timeout=120)
        assert job["state"] == "done", job
        assert job["tag"] == "v1" and job["repository"] == "remote-test/proxy-e2e"
        assert job["result"]["images"][0]["layers"][0]["chunks"] > 0
        # the conversion read through the proxy's cache (or joined containerd's downloads): one upstream fetch each
        assert {d: registry_gets(registry, d) - n for d, n in layer_gets.items()} == dict.fromkeys(layer_gets, 1)
        # 3. the next pull, through the proxy, is lazy
        blob_gets, served = registry.blob_gets(), len(proxy.access())
        ref = f"{proxy.host}/remote-test/proxy-e2e:v1"
        result = liftoff_pull(stack, ref)
        assert [layer["state"] for layer in result["layers"]] == ["remote"] * 3
        assert registry.blob_gets() == blob_gets  # nothing from the registry (the config came from the cache)
        layer_digests = [layer["digest"] for layer in result["layers"]]
        after = proxy.access()[served:]
        assert not [line for line in after if any(d in line for d in layer_digests)], after  # no layer blob from the proxy
        out = stack.containerd.ctr("run", "--rm", "--snapshotter", "liftoff", ref, "proxy-lazy-run", *RUN)
        assert out == EXPECTED
        assert proxy.conversions()["counts"]["done"] >= 1
        assert proxy.metric("liftoff_proxy_conversions_total", result="converted") == 1
    finally:
        stack.stop()
        proxy.stop()
