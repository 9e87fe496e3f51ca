"""The distribution API through the proxy against a real docker-registry: headers, HEAD, ranges,
conditional requests, tags, and what the cache saves (the registry's access log is the witness)."""

from __future__ import annotations

import json
import time

import requests

from layerstore.oci import mediatypes
from tests.faultproxy import FaultProxy
from tests.proxy.helpers import OCI_ACCEPT, cached_files, digest_of, push_image, registry_gets, start_proxy, wait_cached


def test_base_endpoint_answers_as_a_registry(proxy):
    r = proxy.get("/v2/")
    assert r.status_code == 200 and r.json() == {}
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"


def test_manifest_by_tag_and_digest_with_exact_headers(proxy, image, registry):
    r = proxy.get(f"/v2/{image.repository}/manifests/{image.tag}", ns=registry.host, headers={"Accept": OCI_ACCEPT})
    assert r.status_code == 200
    assert r.content == image.manifest
    assert r.headers["Content-Type"] == mediatypes.OCI_MANIFEST
    assert r.headers["Docker-Content-Digest"] == image.manifest_digest
    assert r.headers["ETag"] == f'"{image.manifest_digest}"'
    assert int(r.headers["Content-Length"]) == len(image.manifest)
    head = proxy.get(f"/v2/{image.repository}/manifests/{image.manifest_digest}", method="HEAD")
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["Content-Length"]) == len(image.manifest)
    assert head.headers["Docker-Content-Digest"] == image.manifest_digest
    again = proxy.get(f"/v2/{image.repository}/manifests/{image.manifest_digest}", headers={"If-None-Match": r.headers["ETag"]})
    assert again.status_code == 304


def test_blobs_stream_verified_then_come_from_the_cache(proxy, image, registry):
    for digest in [image.config_digest, *image.layer_digests]:
        data = image.blobs[digest]
        r = proxy.get(image.blob_path(digest), ns=registry.host)
        assert r.status_code == 200 and r.content == data
        assert r.headers["Docker-Content-Digest"] == digest
        assert r.headers["ETag"] == f'"{digest}"'
        assert r.headers["Content-Type"] == "application/octet-stream"
        assert int(r.headers["Content-Length"]) == len(data)
    wait_cached(proxy, image.blobs)
    before = {d: registry_gets(registry, d) for d in image.blobs}
    for digest, data in image.blobs.items():
        assert proxy.get(image.blob_path(digest)).content == data
    assert {d: registry_gets(registry, d) for d in image.blobs} == before  # served from the cache
    assert any("source=cache" in line and image.layer_digests[1] in line for line in proxy.access())


def test_range_requests_on_cached_blobs(proxy, image):
    digest = image.layer_digests[1]
    data = image.blobs[digest]
    proxy.get(image.blob_path(digest))
    wait_cached(proxy, [digest])
    r = proxy.get(image.blob_path(digest), headers={"Range": "bytes=1000-1999"})
    assert r.status_code == 206 and r.content == data[1000:2000]
    assert r.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
    assert int(r.headers["Content-Length"]) == 1000
    tail = proxy.get(image.blob_path(digest), headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == data[-10:]
    rest = proxy.get(image.blob_path(digest), headers={"Range": f"bytes={len(data) - 5}-"})
    assert rest.content == data[-5:]
    past = proxy.get(image.blob_path(digest), headers={"Range": f"bytes={len(data)}-"})
    assert past.status_code == 416 and past.headers["Content-Range"] == f"bytes */{len(data)}"
    assert past.json()["errors"][0]["code"] == "RANGE_INVALID"
    multi = proxy.get(image.blob_path(digest), headers={"Range": "bytes=0-1,5-6"})
    assert multi.status_code == 200 and multi.content == data  # several ranges: the whole body, as RFC 9110 allows


def test_head_of_an_uncached_blob_fetches_nothing(proxy, registry, tmp_path_factory):
    img = push_image(registry.host, tmp_path_factory.mktemp("head"), "proxy-test/head", [50_000])
    digest = img.layer_digests[0]
    r = proxy.get(img.blob_path(digest), method="HEAD")
    assert r.status_code == 200 and int(r.headers["Content-Length"]) == len(img.blobs[digest])
    assert r.headers["Docker-Content-Digest"] == digest
    assert registry_gets(registry, digest) == 0 and digest not in cached_files(proxy)


def test_tags_list_passes_through(proxy, image):
    r = proxy.get(f"/v2/{image.repository}/tags/list")
    assert r.status_code == 200 and r.json() == {"name": image.repository, "tags": [image.tag]}


def test_unknown_manifest_blob_and_repository_are_404_with_error_json(proxy, image):
    missing = "sha256:" + "0" * 64
    cases = [
        (f"/v2/{image.repository}/manifests/no-such-tag", "MANIFEST_UNKNOWN"),
        (f"/v2/{image.repository}/blobs/{missing}", "BLOB_UNKNOWN"),
        ("/v2/proxy-test/no-such-repo/manifests/v1", None),
    ]
    for path, code in cases:
        r = proxy.get(path)
        assert r.status_code == 404, path
        error = r.json()["errors"][0]
        assert error["code"] in ((code,) if code else ("MANIFEST_UNKNOWN", "NAME_UNKNOWN"))
        assert "upstream" in error["message"]
    assert missing not in cached_files(proxy)


def test_a_cached_blob_is_served_only_for_repositories_that_have_it(proxy, image, registry, tmp_path_factory):
    digest = image.layer_digests[1]
    proxy.get(image.blob_path(digest))  # cached through proxy-test/basic
    wait_cached(proxy, [digest])
    gets = registry_gets(registry, digest)
    other = proxy.get(f"/v2/proxy-test/elsewhere/blobs/{digest}")
    assert other.status_code == 404 and other.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    # a repository that does have it: confirmed with a HEAD, then served from the cache
    push_image(registry.host, tmp_path_factory.mktemp("copy"), "proxy-test/copy", [200_000, 3 << 20], seed="proxy-test/basic:v1")
    shared = proxy.get(f"/v2/proxy-test/copy/blobs/{digest}")
    assert shared.status_code == 200 and shared.content == image.blobs[digest]
    assert registry_gets(registry, digest) == gets


def test_tags_are_revalidated_after_the_ttl(registry, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ttl")
    proxy = start_proxy(workdir, [(registry.host, f"http://{registry.host}")], "--tag-ttl", "1")
    try:
        first = push_image(registry.host, workdir, "proxy-test/moving", [1000], seed="one")
        path = "/v2/proxy-test/moving/manifests/v1"
        assert proxy.get(path).headers["Docker-Content-Digest"] == first.manifest_digest
        second = push_image(registry.host, workdir, "proxy-test/moving", [2000], seed="two")
        assert proxy.get(path).headers["Docker-Content-Digest"] == first.manifest_digest  # within the TTL
        time.sleep(1.2)
        assert proxy.get(path).headers["Docker-Content-Digest"] == second.manifest_digest
        # deleted upstream: after the TTL the tag is gone, not served stale; digests stay cached forever
        deleted = requests.delete(f"http://{registry.host}/v2/proxy-test/moving/manifests/{second.manifest_digest}", timeout=10)
        assert deleted.status_code == 202
        time.sleep(1.2)
        gone = proxy.get(path)
        assert gone.status_code == 404 and gone.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        assert proxy.get(f"/v2/proxy-test/moving/manifests/{first.manifest_digest}").content == first.manifest
    finally:
        proxy.stop()


def test_a_stale_tag_is_served_when_the_upstream_times_out(registry, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("stale")
    img = push_image(registry.host, workdir, "proxy-test/stale", [1000])
    relay = FaultProxy(("127.0.0.1", int(registry.host.split(":")[1])), delay_seconds=2.5)
    proxy = start_proxy(workdir, [(registry.host, relay.endpoint)], "--tag-ttl", "0.5", "--upstream-timeout", "1")
    try:
        path = f"/v2/{img.repository}/manifests/{img.tag}"
        assert proxy.get(path).content == img.manifest
        time.sleep(0.6)
        relay.inject("delay")  # the revalidation gets no answer in time
        r = proxy.get(path)
        assert r.status_code == 200 and r.content == img.manifest
        assert "Stale" in r.headers["Warning"]
        assert proxy.metric("liftoff_proxy_stale_tags_served_total") == 1
        relay.inject("delay")  # nothing cached: the outage shows, as the distribution API's error
        never = proxy.get(f"/v2/{img.repository}/manifests/other-tag")
        assert never.status_code == 504 and "did not answer" in never.json()["errors"][0]["message"]
    finally:
        proxy.stop()
        relay.stop()


def test_metrics_count_requests_bytes_hits_and_latency(proxy, image):
    digest = image.layer_digests[0]
    proxy.get(image.blob_path(digest))
    proxy.get(image.blob_path(digest))
    text = requests.get(proxy.url + "/metrics", timeout=10).text
    for name in (
        "liftoff_proxy_requests_total",
        "liftoff_proxy_sent_bytes_total",
        "liftoff_proxy_cache_lookups_total",
        "liftoff_proxy_upstream_request_duration_seconds_bucket",
        "liftoff_proxy_cache_hit_ratio",
        "liftoff_proxy_conversion_queue",
        "liftoff_proxy_cache_bytes",
    ):
        assert name in text, name
    assert proxy.metric("liftoff_proxy_cache_lookups_total", kind="blob", result="hit") >= 1
    assert proxy.metric("liftoff_proxy_sent_bytes_total", kind="blob", source="cache") >= len(image.blobs[digest])
    assert 0 < proxy.metric("liftoff_proxy_cache_hit_ratio") < 1


def test_conversions_endpoint_without_stores(proxy):
    body = proxy.conversions()
    assert body["enabled"] is False and body["jobs"] == [] and set(body["counts"]) == {"queued", "running", "done", "failed"}
    assert json.loads(requests.get(proxy.url + "/liftoff/v1/conversions?state=bogus", timeout=10).text)["errors"]


def test_digests_of_served_blobs_match(proxy, image):
    for digest in image.blobs:
        assert digest_of(proxy.get(image.blob_path(digest)).content) == digest
