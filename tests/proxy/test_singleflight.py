"""Single flight: concurrent pulls of one blob cause one upstream fetch (the registry's access log says
so), every client gets the exact bytes as they arrive, ranges included."""

from __future__ import annotations

import hashlib
import threading
import time

import requests

from tests.faultproxy import FaultProxy
from tests.proxy.helpers import push_image, registry_gets, start_proxy, wait_cached

CLIENTS = 8
MISSING_CLIENTS = 200


def test_concurrent_pulls_of_one_blob_fetch_it_upstream_once(registry, tmp_path):
    image = push_image(registry.host, tmp_path, "singleflight/app", [4 << 20])
    digest = image.layer_digests[0]
    data = image.blobs[digest]
    # the upstream answers after 2 s, so every client arrives while the one fetch is in flight
    relay = FaultProxy(("127.0.0.1", int(registry.host.split(":")[1])), delay_seconds=2.0)
    relay.match = lambda head: head.startswith(b"GET ") and digest.encode() in head.split(b"\r\n", 1)[0]
    relay.inject("delay")
    proxy = start_proxy(tmp_path / "proxy", [(registry.host, relay.endpoint)])
    try:
        results: dict[int, tuple[int, bytes, str | None]] = {}
        start = threading.Barrier(CLIENTS)

        def pull(i: int) -> None:
            headers = {"Range": "bytes=1000000-1999999"} if i % 4 == 3 else {}
            start.wait()
            r = requests.get(proxy.url + image.blob_path(digest), headers=headers, timeout=60)
            results[i] = (r.status_code, r.content, r.headers.get("Content-Range"))

        threads = [threading.Thread(target=pull, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, (status, body, content_range) in results.items():
            if i % 4 == 3:
                assert status == 206 and body == data[1000000:2000000], i
                assert content_range == f"bytes 1000000-1999999/{len(data)}"
            else:
                assert status == 200 and body == data, i
        assert registry_gets(registry, digest) == 1
        assert proxy.metric("liftoff_proxy_cache_lookups_total", kind="blob", result="miss") == 1
        joined = proxy.metric("liftoff_proxy_cache_lookups_total", kind="blob", result="joined")
        hits = proxy.metric("liftoff_proxy_cache_lookups_total", kind="blob", result="hit")
        assert joined + hits == CLIENTS - 1 and joined >= CLIENTS // 2, (joined, hits)  # a very late client may hit the cache
        wait_cached(proxy, [digest])
        assert requests.get(proxy.url + image.blob_path(digest), timeout=30).content == data
        assert registry_gets(registry, digest) == 1
    finally:
        proxy.stop()
        relay.stop()


def test_concurrent_manifest_requests_share_one_upstream_request(registry, tmp_path):
    image = push_image(registry.host, tmp_path, "singleflight/manifest", [1000])
    relay = FaultProxy(("127.0.0.1", int(registry.host.split(":")[1])), delay_seconds=1.0)
    relay.match = lambda head: b"/manifests/" in head.split(b"\r\n", 1)[0]
    relay.inject("delay")
    proxy = start_proxy(tmp_path / "proxy", [(registry.host, relay.endpoint)])
    try:
        seen = relay.requests
        bodies: list[bytes] = []
        threads = [
            threading.Thread(target=lambda: bodies.append(proxy.get(f"/v2/{image.repository}/manifests/v1").content))
            for _ in range(CLIENTS)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert bodies == [image.manifest] * CLIENTS
        assert relay.requests - seen == 1
    finally:
        proxy.stop()
        relay.stop()


def _burst(url: str, method: str = "GET") -> list[tuple[int, dict | None]]:
    """MISSING_CLIENTS requests at once (threads released together); (status, error JSON) of each."""
    answers: list[tuple[int, dict | None]] = []
    start = threading.Barrier(MISSING_CLIENTS)

    def ask() -> None:
        start.wait()
        r = requests.request(method, url, timeout=60)
        answers.append((r.status_code, r.json() if r.content else None))

    threads = [threading.Thread(target=ask) for _ in range(MISSING_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def _upstream_requests(registry, method: str, path: str, expected: int) -> int:
    """`method` requests of `path` in the registry's access log (waiting up to 5 s for `expected` to be written)."""
    deadline = time.monotonic() + 5
    while True:
        count = sum(1 for line in registry.service.log().splitlines() if f'"{method} {path} HTTP/' in line)
        if count >= expected or time.monotonic() > deadline:
            return count


def test_concurrent_requests_for_a_missing_blob_share_one_upstream_miss(registry, tmp_path):
    """A miss is shared as a download is: every client asking while the upstream answers gets its 404."""
    image = push_image(registry.host, tmp_path, "singleflight/missing", [1000])
    missing = "sha256:" + hashlib.sha256(f"never pushed {tmp_path}".encode()).hexdigest()
    present = image.layer_digests[0]
    relay = FaultProxy(("127.0.0.1", int(registry.host.split(":")[1])), delay_seconds=3.0)
    relay.match = lambda head: b"/blobs/" in head.split(b"\r\n", 1)[0]
    proxy = start_proxy(tmp_path / "proxy", [(registry.host, relay.endpoint)])
    try:
        # the upstream's first answer takes 3 s: every client arrives while it is in flight
        for method, path, upstream_method in [
            ("GET", image.blob_path(missing), "GET"),  # a download that ends in 404
            ("HEAD", image.blob_path(missing), "HEAD"),  # a HEAD asked upstream
            ("GET", f"/v2/singleflight/elsewhere/blobs/{present}", "HEAD"),  # cached, but is it in this repository?
        ]:
            if path.endswith(present):
                assert proxy.get(image.blob_path(present)).content == image.blobs[present]
                wait_cached(proxy, [present])
            relay.inject("delay")
            answers = _burst(proxy.url + path, method)
            assert len(answers) == MISSING_CLIENTS
            for status, body in answers:
                assert status == 404, (method, path, status)
                if method == "GET":
                    assert body["errors"][0]["code"] == "BLOB_UNKNOWN" and "not known upstream" in body["errors"][0]["message"]
            assert _upstream_requests(registry, upstream_method, path, 1) == 1, (method, path)
        assert _upstream_requests(registry, "HEAD", image.blob_path(missing), 1) == 1  # the GETs asked no HEAD
    finally:
        proxy.stop()
        relay.stop()
