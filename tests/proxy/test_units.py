"""The proxy's pure parts on their own: request routing (what is refused), byte ranges, upstream options,
platform choice, the SQLite queue's state machine and the disk cache's LRU."""

from __future__ import annotations

import os
import sqlite3
import time

import pytest

from layerstore.errors import LiftoffError
from layerstore.oci.platform import parse_platforms, platform_from_json
from layerstore.units import parse_size
from registry_proxy.blobcache import BlobCache
from registry_proxy.config import ProxyConfig, parse_listen, parse_upstreams
from registry_proxy.errors import ProxyError
from registry_proxy.queue import ConversionQueue
from registry_proxy.routes import Route, parse_route, pick_upstream
from registry_proxy.sending import parse_range
from registry_proxy.trigger import wanted

D = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/v2/", Route("base")),
        ("/v2", Route("base")),
        ("/v2/library/alpine/manifests/3.20", Route("manifest", "library/alpine", "3.20")),
        (f"/v2/a/b/c/manifests/{D}", Route("manifest", "a/b/c", D)),
        (f"/v2/x/blobs/{D}", Route("blob", "x", D)),
        ("/v2/my-org/my.app__x/tags/list", Route("tags", "my-org/my.app__x")),
        ("/v2/x/manifests/y/manifests/latest", Route("manifest", "x/manifests/y", "latest")),
    ],
)
def test_routes(path, route):
    assert parse_route("GET", path, path) == route


@pytest.mark.parametrize(
    ("method", "raw", "status", "code"),
    [
        ("GET", "http://evil.example/v2/", 403, "DENIED"),
        ("GET", "/v2/evil.example%2fx/manifests/v1", 400, "NAME_INVALID"),
        ("GET", "/v2/127.0.0.1:5000/x/manifests/v1", 400, "NAME_INVALID"),
        ("GET", "/v2/x/../y/manifests/v1", 400, "NAME_INVALID"),
        ("GET", "/v2//x/manifests/v1", 400, "NAME_INVALID"),
        ("GET", "/v2/X/manifests/v1", 400, "NAME_INVALID"),
        ("GET", "/v2/x/manifests/v1@evil", 400, "MANIFEST_INVALID"),
        ("GET", "/v2/x/blobs/latest", 400, "DIGEST_INVALID"),
        ("GET", "/v2/x/blobs/sha512:" + "a" * 128, 400, "DIGEST_INVALID"),
        ("GET", "/v2/x/blobs/sha256:" + "A" * 64, 400, "DIGEST_INVALID"),
        ("GET", "/v2/" + "a" * 256 + "/manifests/v1", 400, "NAME_INVALID"),
        ("GET", "/v2/_catalog", 404, "UNSUPPORTED"),
        ("GET", "/v3/x", 404, "UNSUPPORTED"),
        ("POST", "/v2/x/blobs/uploads/", 405, "UNSUPPORTED"),
        ("PUT", "/v2/x/manifests/v1", 405, "UNSUPPORTED"),
        ("DELETE", f"/v2/x/blobs/{D}", 405, "UNSUPPORTED"),
    ],
)
def test_refused_requests(method, raw, status, code):
    with pytest.raises(ProxyError) as caught:
        parse_route(method, raw, raw if raw.startswith("/") else "/v2/")
    assert (caught.value.status, caught.value.code) == (status, code)


def test_the_upstream_comes_only_from_ns_or_the_default():
    config = ProxyConfig(
        parse_upstreams(["docker.io=https://registry-1.docker.io", "127.0.0.1:5000=http://h:1"], ["127.0.0.1:5000"])
    )
    assert pick_upstream(config, []).name == "docker.io"
    assert pick_upstream(config, ["127.0.0.1:5000"]).url == "http://h:1"
    assert pick_upstream(config, ["DOCKER.IO"]).name == "docker.io"
    for bad in (["evil.example"], ["docker.io", "127.0.0.1:5000"], ["registry-1.docker.io"]):
        with pytest.raises(ProxyError) as caught:
            pick_upstream(config, bad)
        assert caught.value.status == 403


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, (0, 100, False)),
        ("bytes=0-9", (0, 10, True)),
        ("bytes=90-", (90, 10, True)),
        ("bytes=-5", (95, 5, True)),
        ("bytes=-500", (0, 100, True)),
        ("bytes=50-500", (50, 50, True)),
        ("bytes=5-2", (0, 100, False)),
        ("bytes=0-1,4-5", (0, 100, False)),
        ("items=0-1", (0, 100, False)),
        ("bytes=-", (0, 100, False)),
    ],
)
def test_ranges(header, expected):
    assert parse_range(header, 100) == expected


def test_a_range_past_the_end_is_416():
    with pytest.raises(ProxyError) as caught:
        parse_range("bytes=100-", 100)
    assert caught.value.status == 416 and caught.value.headers["Content-Range"] == "bytes */100"


def test_options():
    assert parse_size("20G") == 20 << 30 and parse_size("1.5MiB") == 3 << 19 and parse_size("4096") == 4096
    assert parse_listen(":5050") == ("0.0.0.0", 5050) and parse_listen("[::1]:80") == ("::1", 80)
    (upstream,) = parse_upstreams(["ghcr.io=ghcr.io"])
    assert upstream.url == "https://ghcr.io" and not upstream.pass_credentials
    (local,) = parse_upstreams(["127.0.0.1:5000=127.0.0.1:5000"], ["127.0.0.1:5000"], ["127.0.0.1:5000"])
    assert local.url == "http://127.0.0.1:5000" and local.pass_credentials
    with pytest.raises(LiftoffError):
        parse_upstreams(["a.io=ftp://a.io"])


def test_platform_choice():
    def want(platform: dict, platforms: list[str]) -> bool:
        return wanted(platform_from_json(platform, "test"), parse_platforms(platforms))

    amd64, arm64v8 = {"os": "linux", "architecture": "amd64"}, {"os": "linux", "architecture": "arm64", "variant": "v8"}
    assert want(amd64, ["linux/amd64"]) and not want(arm64v8, ["linux/amd64"])
    assert want(arm64v8, ["linux/arm64"]) and want(arm64v8, ["linux/arm64/v8"]) and not want(arm64v8, ["linux/arm64/v7"])
    assert want({"os": "linux", "architecture": "x86_64"}, ["linux/amd64"])  # containerd's normalisation
    assert not want({"os": "unknown", "architecture": "unknown"}, [])  # attestations
    assert want(arm64v8, [])


def test_queue_state_machine():
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.row_factory = sqlite3.Row
    queue = ConversionQueue(db, retries=2, backoff=0.2, retry_failed_after=0.3)
    index, child = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    assert queue.enqueue("r.io", "app", None, index, "index", children=[child])
    assert not queue.enqueue("r.io", "app", "v1", index, "index")  # deduplicated, the tag remembered
    assert not queue.enqueue("r.io", "app", None, child, "manifest")  # covered by the index's job
    job = queue.claim()
    assert job.digest == index and job.tag == "v1" and job.attempts == 1 and queue.claim() is None
    assert queue.failed(job, "network", permanent=False)  # retried after the backoff
    assert queue.claim() is None and queue.next_due() > time.time()
    time.sleep(0.25)
    job = queue.claim()
    assert job.attempts == 2
    assert not queue.failed(job, "network again", permanent=False)  # out of retries
    assert queue.counts()["failed"] == 1 and queue.jobs("failed")[0]["error"] == "network again"
    assert not queue.enqueue("r.io", "app", "v1", index, "index")  # failed recently: not yet
    time.sleep(0.35)
    assert queue.enqueue("r.io", "app", "v1", index, "index")  # failed long ago: queued again
    job = queue.claim()
    queue.requeue(job)  # interrupted by a shutdown: the attempt does not count
    job = queue.claim()
    assert job.attempts == 1
    queue.done(job, {"ok": True})
    assert queue.counts() == {"queued": 0, "running": 0, "done": 1, "failed": 0}
    db.execute("UPDATE conversions SET state = 'running'")
    ConversionQueue(db, retries=2, backoff=0.2)  # a restart puts running jobs back
    assert queue.counts()["queued"] == 1


def test_cache_lru_order_survives_a_restart(tmp_path):
    cache = BlobCache(tmp_path, capacity=300)
    digests = ["sha256:" + c * 64 for c in "abcd"]
    for digest in digests[:3]:
        fd, temp = cache.new_temp()
        os.write(fd, b"x" * 100)
        os.close(fd)
        cache.admit(temp, digest, 100)
        time.sleep(0.01)  # distinct mtimes
    stream, _ = cache.open(digests[0])  # a is now the most recent
    stream.close()
    reopened = BlobCache(tmp_path, capacity=300)
    fd, temp = reopened.new_temp()
    os.write(fd, b"y" * 100)
    os.close(fd)
    reopened.admit(temp, digests[3], 100)
    assert [d in reopened for d in digests] == [True, False, True, True]  # b was the least recently used
    assert reopened.used == 300 and not reopened.path(digests[1]).exists()
