"""The disk cache: size cap with least-recently-used eviction, blobs larger than the cache streamed but not
kept, and a restart that keeps what was verified and drops what was half written."""

from __future__ import annotations

import os

from tests.proxy.helpers import cached_files, push_image, registry_gets, start_proxy, wait_cached

MIB = 1 << 20


def test_lru_eviction_under_the_cap_and_restart(registry, tmp_path):
    image = push_image(registry.host, tmp_path, "cache/lru", [2 * MIB, 2 * MIB, 2 * MIB, 7 * MIB])
    a, b, c, huge = image.layer_digests
    workdir = tmp_path / "proxy"
    upstream = [(registry.host, f"http://{registry.host}")]
    proxy = start_proxy(workdir, upstream, "--cache-size", "5M")
    try:
        for digest in (a, b):
            assert proxy.get(image.blob_path(digest)).content == image.blobs[digest]
        wait_cached(proxy, [a, b])
        assert proxy.get(image.blob_path(a)).status_code == 200  # a hit: a is now more recent than b
        assert proxy.get(image.blob_path(c)).content == image.blobs[c]
        wait_cached(proxy, [c])
        assert cached_files(proxy) == {a, c}  # b, the least recently used, made room
        assert proxy.metric("liftoff_proxy_cache_evictions_total") == 1
        assert proxy.metric("liftoff_proxy_cache_bytes") <= 5 * MIB
        # larger than the whole cache: served (verified) but not kept
        assert proxy.get(image.blob_path(huge)).content == image.blobs[huge]
        assert proxy.get(image.blob_path(huge)).content == image.blobs[huge]
        assert registry_gets(registry, huge) == 2 and huge not in cached_files(proxy)
    finally:
        proxy.stop()
    # a half-written download and a torn cache file left by a crash are dropped at start; verified blobs stay
    (workdir / "cache" / "tmp" / "leftover").write_bytes(b"partial")
    torn = workdir / "cache" / "blobs" / "sha256" / "ab" / ("ab" + "0" * 62)
    torn.parent.mkdir(exist_ok=True)
    torn.write_bytes(b"")
    gets = registry_gets(registry, a)
    proxy = start_proxy(workdir, upstream, "--cache-size", "5M")
    try:
        assert os.listdir(workdir / "cache" / "tmp") == [] and not torn.exists()
        assert proxy.get(image.blob_path(a)).content == image.blobs[a]
        assert registry_gets(registry, a) == gets  # from the cache that survived the restart
        assert proxy.metric("liftoff_proxy_cache_bytes") == len(image.blobs[a]) + len(image.blobs[c])
    finally:
        proxy.stop()
