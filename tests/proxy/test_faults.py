"""Bad input from both sides: faults injected between the proxy and the real registry (a relay), and
requests that try to make the proxy reach a host it was not configured for. Every failure is the
distribution API's error JSON with the right status (or, once a large body is streaming, a cut
connection short of the last byte), and nothing bad is cached."""

from __future__ import annotations

import socket
import sqlite3
import threading
import uuid

import pytest
import requests

from tests.faultproxy import FaultProxy
from tests.proxy.helpers import cached_files, push_image, registry_gets, start_proxy, wait_cached

SMALL, LARGE = 100_000, 3 << 20


def _is_get(part: str):
    return lambda head: head.startswith(b"GET ") and part.encode() in head.split(b"\r\n", 1)[0]


@pytest.fixture(scope="module")
def relay(registry):
    r = FaultProxy(("127.0.0.1", int(registry.host.split(":")[1])), stall_seconds=3.0, delay_seconds=2.5)
    yield r
    r.stop()


@pytest.fixture(scope="module")
def faulty(registry, relay, tmp_path_factory):
    """A proxy whose upstream (named as the registry) is reached through the relay; 1 s timeouts."""
    p = start_proxy(tmp_path_factory.mktemp("faulty"), [(registry.host, relay.endpoint)], "--upstream-timeout", "1")
    yield p
    p.stop()


@pytest.fixture
def fresh(registry, relay, tmp_path):
    """A new image (a small and a large layer) no cache has seen; the relay's queue emptied afterwards."""
    image = push_image(registry.host, tmp_path, f"faults/{uuid.uuid4().hex[:10]}", [SMALL, LARGE])
    yield image
    relay.clear()


def _error(response: requests.Response) -> dict:
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    return response.json()["errors"][0]


def _recovers(proxy, image, digest) -> None:
    """Nothing was cached by the failure: the next request fetches again, correctly, and caches it."""
    assert digest not in cached_files(proxy)
    r = proxy.get(image.blob_path(digest))
    assert r.status_code == 200 and r.content == image.blobs[digest]
    wait_cached(proxy, [digest])


@pytest.mark.parametrize("fault", ["corrupt", "truncate", "reset"])
def test_a_bad_small_blob_is_an_error_json_and_not_cached(faulty, relay, fresh, registry, fault):
    digest = fresh.layer_digests[0]
    relay.match = _is_get(f"/blobs/{digest}")
    relay.inject(fault)
    r = faulty.get(fresh.blob_path(digest))
    assert r.status_code == 502
    error = _error(r)
    if fault == "corrupt":
        assert error["code"] == "DIGEST_INVALID" and "wrong content" in error["message"]
        assert "nothing was cached" in error["message"]
    else:
        assert "bytes" in error["message"], error
    _recovers(faulty, fresh, digest)
    assert registry_gets(registry, digest) == 2


@pytest.mark.parametrize("fault", ["corrupt", "truncate"])
def test_a_bad_large_blob_is_cut_short_of_its_last_byte(faulty, relay, fresh, fault):
    digest = fresh.layer_digests[1]
    relay.match = _is_get(f"/blobs/{digest}")
    relay.inject(fault)
    received = bytearray()
    with requests.get(faulty.url + fresh.blob_path(digest), stream=True, timeout=30) as r:
        assert r.status_code == 200 and int(r.headers["Content-Length"]) == len(fresh.blobs[digest])
        with pytest.raises(requests.exceptions.RequestException):
            for block in r.iter_content(65536):
                received += block
    assert len(received) < len(fresh.blobs[digest])  # never the whole (wrong) body
    _recovers(faulty, fresh, digest)
    assert any(" 599 " in line and digest in line for line in faulty.access())


@pytest.mark.parametrize(
    ("fault", "status", "code", "words"),
    [
        ("404", 404, "BLOB_UNKNOWN", "not known upstream"),
        ("500", 502, "UNKNOWN", "answered 500"),
        ("401", 403, "DENIED", "refused the proxy's credentials"),
    ],
)
def test_upstream_error_statuses_map_to_registry_errors(faulty, relay, fresh, fault, status, code, words):
    digest = fresh.layer_digests[0]
    relay.match = _is_get(f"/blobs/{digest}")
    relay.inject(fault)
    r = faulty.get(fresh.blob_path(digest))
    assert r.status_code == status
    error = _error(r)
    assert error["code"] == code and words in error["message"], error
    _recovers(faulty, fresh, digest)


def test_upstream_errors_on_manifests_cache_nothing(faulty, relay, fresh):
    path = f"/v2/{fresh.repository}/manifests/{fresh.tag}"
    relay.match = _is_get("/manifests/")
    relay.inject("500")
    assert faulty.get(path).status_code == 502
    relay.inject("corrupt")  # the body no longer matches the registry's Docker-Content-Digest
    bad = faulty.get(path)
    assert bad.status_code == 502 and _error(bad)["code"] == "DIGEST_INVALID"
    for fault in ("truncate", "reset"):
        relay.inject(fault)
        broken = faulty.get(path)
        assert broken.status_code == 502 and "broke off" in _error(broken)["message"], broken.text
    relay.inject("stall")
    stalled = faulty.get(path)
    assert stalled.status_code == 504 and "stalled" in _error(stalled)["message"]
    relay.inject("corrupt")
    by_digest = faulty.get(f"/v2/{fresh.repository}/manifests/{fresh.manifest_digest}")
    assert by_digest.status_code == 502 and _error(by_digest)["code"] == "DIGEST_INVALID"
    good = faulty.get(path)
    assert good.status_code == 200 and good.content == fresh.manifest


def test_a_silent_upstream_times_out(faulty, relay, fresh):
    digest = fresh.layer_digests[0]
    relay.match = _is_get(f"/blobs/{digest}")
    relay.inject("delay")  # no response for 2.5 s; the proxy waits 1 s
    r = faulty.get(fresh.blob_path(digest))
    assert r.status_code == 504 and "did not answer" in _error(r)["message"]
    relay.inject("stall")  # half the body, then silence
    stalled = faulty.get(fresh.blob_path(digest))
    assert stalled.status_code == 504 and "stalled" in _error(stalled)["message"]
    _recovers(faulty, fresh, digest)


def test_a_stalling_large_blob_is_cut(faulty, relay, fresh):
    digest = fresh.layer_digests[1]
    relay.match = _is_get(f"/blobs/{digest}")
    relay.inject("stall")
    with pytest.raises(requests.exceptions.RequestException):
        r = requests.get(faulty.url + fresh.blob_path(digest), timeout=30)
        r.raise_for_status()
        assert len(r.content) < LARGE
    _recovers(faulty, fresh, digest)


def test_an_oversized_manifest_is_refused_and_not_cached(registry, fresh, tmp_path):
    proxy = start_proxy(tmp_path / "small", [(registry.host, f"http://{registry.host}")], "--max-manifest-size", "300")
    try:
        assert len(fresh.manifest) > 300
        for ref in (fresh.tag, fresh.manifest_digest):
            r = proxy.get(f"/v2/{fresh.repository}/manifests/{ref}")
            assert r.status_code == 502
            error = _error(r)
            assert error["code"] == "MANIFEST_INVALID" and "over the 300 byte limit" in error["message"]
        with sqlite3.connect(proxy.cache_dir / "state.db") as db:
            assert db.execute("SELECT count(*) FROM manifests").fetchone()[0] == 0
            assert db.execute("SELECT count(*) FROM tags").fetchone()[0] == 0
    finally:
        proxy.stop()


class Canary:
    """A listener on a port nothing should ever connect to."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()


def _raw(proxy, request_line: str) -> tuple[int, bytes]:
    """Send one request line as written (no client normalization); (status, body)."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(f"{request_line}\r\nHost: {proxy.host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def test_no_open_proxy_unconfigured_hosts_and_path_tricks_are_refused(faulty, relay, fresh):
    canary = Canary()
    evil = f"127.0.0.1:{canary.port}"
    seen = relay.requests
    r = faulty.get(f"/v2/{fresh.repository}/manifests/{fresh.tag}", ns=evil)
    assert r.status_code == 403
    error = _error(r)
    assert error["code"] == "DENIED" and "not configured" in error["message"] and "--upstream" in error["message"]
    tricks = [
        f"GET http://{evil}/v2/{fresh.repository}/manifests/{fresh.tag} HTTP/1.1",  # absolute form
        f"GET /v2/{evil}/x/manifests/latest HTTP/1.1",
        "GET /v2/x/../../../etc/passwd/manifests/latest HTTP/1.1",
        "GET /v2/evil.example%2Fx/manifests/latest HTTP/1.1",
        f"GET /v2/x/manifests/latest@{evil} HTTP/1.1",
        f"GET /v2/x/blobs/sha256:{'a' * 64}@{evil} HTTP/1.1",
        f"GET //{evil}/v2/ HTTP/1.1",
        f"GET /v2/x/manifests/latest?ns={evil}&ns={fresh.repository} HTTP/1.1",
        f"CONNECT {evil} HTTP/1.1",
        "POST /v2/x/blobs/uploads/ HTTP/1.1",
        "GET /v2/UPPER/manifests/latest HTTP/1.1",
        f"GET /v2/x/blobs/sha512:{'a' * 128} HTTP/1.1",
    ]
    for line in tricks:
        status, body = _raw(faulty, line)
        assert status in (400, 403, 404, 405), (line, status, body)
        if not line.startswith("CONNECT"):
            assert b'"errors"' in body, (line, body)
    assert canary.connections == 0
    assert relay.requests == seen  # not even the configured upstream was asked
