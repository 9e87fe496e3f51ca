"""Single flight: concurrent pulls of one blob cause one upstream fetch (the registry's access log says
so), every client gets the exact bytes as they arrive, ranges included."""

from __future__ import annotations

import threading

import requests

from tests.faultproxy import FaultProxy
from tests.proxy.helpers import push_image, registry_gets, start_proxy, wait_cached

CLIENTS = 8


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
