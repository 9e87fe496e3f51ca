"""Convert on first pull: the persistent queue (deduplicated, covered index children, platforms), retries
with backoff, failures recorded, a conversion interrupted by a killed proxy completed after restart."""

from __future__ import annotations

import json
import time
from pathlib import Path

from layerstore.layout import image_key
from layerstore.stores import open_store
from liftoff.devstack.ocibuild import LayoutWriter, Member, make_tar
from liftoff.devstack.services import push_layout
from tests.faultproxy import FaultProxy
from tests.proxy.helpers import OCI_ACCEPT, push_image, start_proxy


def _push_index(registry, tmp_path, repository: str) -> dict:
    layout = tmp_path / "index-layout"
    writer = LayoutWriter(layout)
    children = {
        arch: writer.add_image([make_tar([Member("arch", data=f"{arch}\n".encode())])], platform=("linux", arch))
        for arch in ("amd64", "arm64")
    }
    index = writer.add_index(list(children.values()))
    writer.tag(index, "v1")
    push_layout(layout, "v1", registry.host, repository)
    return {"index": index["digest"], **{arch: d["digest"] for arch, d in children.items()}}


def _converter_pid(proxy) -> int:
    """The pid of the proxy's running conversion child."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for child in Path(f"/proc/{proxy.process.pid}/task").glob("*/children"):
            for pid in child.read_text().split():
                if "registry_proxy.convert_job" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                    return int(pid)
        time.sleep(0.05)
    raise AssertionError("no conversion child process")


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        stat = Path(f"/proc/{pid}/stat").read_text(errors="replace") if Path(f"/proc/{pid}/stat").exists() else ""
        if ") Z " in stat:  # a zombie: dead, not yet reaped
            return
        assert time.monotonic() < deadline, f"conversion child {pid} outlived the proxy"
        time.sleep(0.05)


def test_first_pulls_queue_one_job_per_image_and_index_children_are_covered(registry, tmp_path):
    store = f"file://{tmp_path / 'store'}"
    proxy = start_proxy(
        tmp_path / "proxy", [(registry.host, f"http://{registry.host}")], "--store", store, "--platform", "linux/amd64"
    )
    try:
        image = push_image(registry.host, tmp_path, "convert/single", [30_000])
        for ref, method in ((image.tag, "HEAD"), (image.tag, "GET"), (image.manifest_digest, "GET"), (image.tag, "GET")):
            assert proxy.get(f"/v2/{image.repository}/manifests/{ref}", method=method).status_code == 200
        job = proxy.wait_job(image.manifest_digest)
        assert job["state"] == "done" and job["attempts"] == 1 and job["tag"] == "v1"
        digests = _push_index(registry, tmp_path, "convert/multi")
        assert proxy.get("/v2/convert/multi/manifests/v1", headers={"Accept": OCI_ACCEPT}).status_code == 200
        assert proxy.get(f"/v2/convert/multi/manifests/{digests['amd64']}").status_code == 200  # covered by the index's job
        index_job = proxy.wait_job(digests["index"])
        assert index_job["state"] == "done", index_job
        assert [i["platform"]["architecture"] for i in index_job["result"]["images"]] == ["amd64"]  # --platform
        assert proxy.job(digests["amd64"]) is None
        # a platform not chosen, pulled by digest anyway: converted on its own, since a node pulled it
        assert proxy.get(f"/v2/convert/multi/manifests/{digests['arm64']}").status_code == 200
        assert proxy.wait_job(digests["arm64"])["state"] == "done"
        assert proxy.conversions()["counts"] == {"queued": 0, "running": 0, "done": 3, "failed": 0}
        converted = open_store(store)
        for digest in (image.manifest_digest, digests["index"], digests["amd64"], digests["arm64"]):
            assert converted.size(image_key(digest)) is not None, digest
        record = json.loads(converted.get(image_key(image.manifest_digest)))
        assert f"{registry.host}/convert/single:v1" in record["references"]
        # another proxy (a fresh cache) meeting an image already in the store does no conversion work
        second = start_proxy(tmp_path / "second", [(registry.host, f"http://{registry.host}")], "--store", store)
        try:
            second.get(f"/v2/{image.repository}/manifests/{image.tag}")
            assert second.wait_job(image.manifest_digest)["result"] == {"already_converted": True}
        finally:
            second.stop()
    finally:
        proxy.stop()


def test_failures_are_retried_with_backoff_then_recorded(registry, tmp_path):
    unwritable = "file:///proc/liftoff-proxy-test-store"  # looks empty; the converter cannot create it
    proxy = start_proxy(
        tmp_path / "proxy",
        [(registry.host, f"http://{registry.host}")],
        "--store", unwritable, "--convert-retries", "3", "--retry-backoff", "0.3",
    )  # fmt: skip
    try:
        image = push_image(registry.host, tmp_path, "convert/unwritable", [1000])
        started = time.monotonic()
        proxy.get(f"/v2/{image.repository}/manifests/{image.tag}")
        job = proxy.wait_job(image.manifest_digest, states=("failed",))
        assert job["attempts"] == 3
        assert time.monotonic() - started >= 0.3 + 0.6  # backoff doubles: 0.3 s, then 0.6 s
        assert "cannot create the store directory /proc/liftoff-proxy-test-store" in job["error"], job["error"]
        assert proxy.metric("liftoff_proxy_conversions_total", result="retry") == 2
        assert proxy.metric("liftoff_proxy_conversions_total", result="failed") == 1
        assert proxy.metric("liftoff_proxy_conversion_queue", state="failed") == 1
        failed = proxy.get("/liftoff/v1/conversions", params={"state": "failed"}).json()["jobs"]
        assert [j["digest"] for j in failed] == [image.manifest_digest]
        # the image is still served: conversion is an optimization, never in the pull's way
        assert proxy.get(f"/v2/{image.repository}/manifests/{image.tag}").status_code == 200
    finally:
        proxy.stop()


def test_an_image_that_cannot_be_converted_fails_once_without_retries(registry, tmp_path):
    layout = tmp_path / "broken"
    writer = LayoutWriter(layout)
    digest, size = writer.add_blob(make_tar([Member("x", data=b"x")]))
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": size}
    descriptor = writer.add_manifest([layer], [])  # the config lists no diff_ids for its one layer
    writer.tag(descriptor, "v1")
    push_layout(layout, "v1", registry.host, "convert/broken")
    proxy = start_proxy(
        tmp_path / "proxy", [(registry.host, f"http://{registry.host}")], "--store", f"file://{tmp_path / 'store'}"
    )
    try:
        assert proxy.get("/v2/convert/broken/manifests/v1").status_code == 200
        job = proxy.wait_job(descriptor["digest"], states=("failed",))
        assert job["attempts"] == 1 and "diff_ids" in job["error"], job
    finally:
        proxy.stop()


def test_a_conversion_interrupted_by_a_killed_proxy_completes_after_restart(registry, tmp_path):
    image = push_image(registry.host, tmp_path, "convert/interrupted", [2 << 20])
    relay = FaultProxy(("127.0.0.1", int(registry.host.split(":")[1])), delay_seconds=1.5)
    relay.match = lambda head: b"/blobs/" in head.split(b"\r\n", 1)[0]
    relay.inject("delay", "delay")  # the conversion's blob reads hang for a while
    workdir = tmp_path / "proxy"
    store = f"file://{tmp_path / 'store'}"
    args = ("--store", store, "--upstream-timeout", "10")
    proxy = start_proxy(workdir, [(registry.host, relay.endpoint)], *args)
    try:
        proxy.get(f"/v2/{image.repository}/manifests/{image.tag}")
        proxy.wait_job(image.manifest_digest, states=("running",), timeout=30)
        child = _converter_pid(proxy)
        proxy.stop(kill=True)
        _wait_gone(child)  # the conversion child does not outlive the proxy
        proxy = start_proxy(workdir, [(registry.host, relay.endpoint)], *args)
        job = proxy.wait_job(image.manifest_digest, timeout=60)
        assert job["state"] == "done" and job["attempts"] == 2, job
        assert open_store(store).size(image_key(image.manifest_digest)) is not None
    finally:
        proxy.stop()
        relay.stop()
