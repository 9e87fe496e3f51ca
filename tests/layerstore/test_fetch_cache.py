"""The chunk fetcher and cache: verification, fall-through, single flight, eviction, torn files."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest
import zstandard

from layerstore.cache import ChunkCache
from layerstore.errors import StoreError, StoreUnreachable
from layerstore.fetch import ChunkFetcher, ChunkUnavailable
from layerstore.layout import chunk_key
from layerstore.stores import FileStore, open_store
from tests.faultproxy import FaultProxy
from tests.silent_server import SilentServer


class CountingStore(FileStore):
    """A real file store that counts its reads (to observe single flight)."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self.gets = 0

    def get(self, key: str) -> bytes:
        self.gets += 1
        return super().get(key)


def put_chunk(store: FileStore, data: bytes, stored: bytes | None = None) -> bytes:
    sha = hashlib.sha256(data).digest()
    store.prepare_writes()
    store.put(chunk_key(sha), stored if stored is not None else zstandard.ZstdCompressor().compress(data))
    return sha


def test_corrupt_copy_falls_through_to_a_good_store(tmp_path):
    data = os.urandom(100_000)
    bad, good = FileStore(tmp_path / "a"), FileStore(tmp_path / "b")
    sha = put_chunk(bad, data, zstandard.ZstdCompressor().compress(b"something else entirely"))
    put_chunk(good, data)
    fetcher = ChunkFetcher([bad, good], ChunkCache(tmp_path / "cache", 1 << 30))
    assert fetcher.read(sha, len(data), 10, 20, "layer") == data[10:30]
    assert fetcher.stats.per_store == {good.url: 1}


def test_corrupt_everywhere_is_refused_within_the_budget(tmp_path):
    data = os.urandom(50_000)
    store = FileStore(tmp_path / "a")
    sha = put_chunk(store, data, zstandard.ZstdCompressor().compress(data[:-1] + b"X"))
    fetcher = ChunkFetcher([store], ChunkCache(tmp_path / "cache", 1 << 30), retry_seconds=0.5, backoff=0.05)
    with pytest.raises(ChunkUnavailable, match=f"chunk {sha.hex()} of layer sha256:x.*does not match its digest"):
        fetcher.read(sha, len(data), 0, 10, "sha256:x")
    assert fetcher.stats.failures == 1 and fetcher.stats.retries >= 1
    assert sha not in fetcher.cache  # unverified bytes never land in the cache


def test_missing_everywhere_fails_fast(tmp_path):
    store = FileStore(tmp_path / "a")
    store.prepare_writes()
    fetcher = ChunkFetcher([store], ChunkCache(tmp_path / "cache", 1 << 30), retry_seconds=60, backoff=0.05)
    with pytest.raises(ChunkUnavailable, match="not found"):
        fetcher.read(b"\x01" * 32, 10, 0, 10)
    assert fetcher.stats.retries == 1


def test_single_flight(tmp_path):
    data = os.urandom(1 << 20)
    store = CountingStore(tmp_path / "a")
    sha = put_chunk(store, data)
    fetcher = ChunkFetcher([store], ChunkCache(tmp_path / "cache", 1 << 30))
    results = []
    threads = [threading.Thread(target=lambda: results.append(fetcher.read(sha, len(data), 0, len(data)))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [data] * 8 and store.gets == 1


def test_cache_cap_eviction_and_torn_files(tmp_path):
    cache = ChunkCache(tmp_path / "cache", capacity=250_000)
    chunks = [os.urandom(100_000) for _ in range(4)]
    digests = [hashlib.sha256(c).digest() for c in chunks]
    for sha, data in zip(digests, chunks, strict=True):
        cache.put(sha, data)
    assert cache.used <= 250_000 and cache.evictions == 2
    assert cache.read(digests[0], 0, 5) is None and cache.read(digests[3], 0, 5) == chunks[3][:5]
    # a restart finds a damaged file (e.g. torn by a power cut) and drops it instead of serving it
    with open(cache.path(digests[2]), "r+b") as f:
        f.write(b"garbage")
    (cache.path(digests[3]).parent / f"{digests[3].hex()}.tmp-dead").write_bytes(b"half")
    again = ChunkCache(tmp_path / "cache", capacity=250_000)
    assert again.read(digests[2], 0, 5) is None and digests[2] not in again
    assert again.read(digests[3], 0, 5) == chunks[3][:5]
    assert not list(cache.dir.rglob("*.tmp-*"))
    assert again.retain({digests[3]}) == 0 and again.retain(set()) == 1 and not again.digests()


@pytest.mark.parametrize("retry_seconds", [0.0, 2.0])
def test_a_store_that_never_answers_fails_within_the_retry_budget(tmp_path, aws_credentials, retry_seconds):
    """EIO comes after retry_seconds plus at most one request's timeout; each attempt is one request (botocore
    does not retry beneath the fetcher's own retries)."""
    server = SilentServer()
    store = open_store(f"s3://chunks/region-a?endpoint_url={server.endpoint}&path_style=true")
    request_timeout = 1.0
    fetcher = ChunkFetcher(
        [store], ChunkCache(tmp_path / "cache", 1 << 30), retry_seconds=retry_seconds, request_timeout=request_timeout
    )
    try:
        started = time.monotonic()
        with pytest.raises(ChunkUnavailable) as error:
            fetcher.read(b"\x02" * 32, 10, 0, 10, "sha256:layer")
        elapsed = time.monotonic() - started
    finally:
        server.stop()
        store.close()
    assert request_timeout * 0.9 <= elapsed <= retry_seconds + request_timeout + 1.0, elapsed
    message = str(error.value)
    assert f"chunk {'02' * 32} of layer sha256:layer could not be fetched from s3://chunks/region-a/" in message
    assert "did not answer within 1 s" in message, message
    assert server.connections == fetcher.stats.retries + 1  # one request per attempt


@pytest.fixture
def relayed_s3(s3_store_url):
    """An S3 store (moto) behind a fault-injecting relay, and the relay."""
    store = open_store(s3_store_url)
    port = int(store.endpoint_url.rsplit(":", 1)[1])
    proxy = FaultProxy(("127.0.0.1", port), match=lambda head: b"/chunks/" in head)
    relayed = open_store(s3_store_url.replace("?", f"?endpoint_url={proxy.endpoint}&"))
    yield store, relayed, proxy
    relayed.close()
    store.close()
    proxy.stop()


def test_a_store_that_drops_connections_is_unreachable_and_throttling_is_not(relayed_s3):
    store, relayed, proxy = relayed_s3
    sha = hashlib.sha256(b"x").digest()
    store.put(chunk_key(sha), zstandard.ZstdCompressor().compress(b"x"))
    proxy.always("reset")
    with pytest.raises(StoreUnreachable):
        relayed.single_attempt(2.0).get(chunk_key(sha))
    proxy.clear()
    proxy.always("503")
    with pytest.raises(StoreError) as error:
        relayed.single_attempt(2.0).get(chunk_key(sha))
    assert not isinstance(error.value, StoreUnreachable), error.value
    proxy.clear()
    assert relayed.single_attempt(2.0).get(chunk_key(sha))


def _fetch_in_thread(fetcher: ChunkFetcher, sha: bytes, size: int) -> tuple[threading.Thread, list]:
    done: list = []

    def run() -> None:
        done.append(fetcher.read(sha, size, 0, size))
        done.append(time.monotonic())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, done


def _wait_for_a_failed_round(proxy: FaultProxy, timeout: float = 20.0) -> None:
    """Until the relay has dropped the fetch's first request (the fetch then pauses before its next round)."""
    deadline = time.monotonic() + timeout
    while not proxy.injected:
        assert time.monotonic() < deadline, "the fetch never reached the store"
        time.sleep(0.01)
    time.sleep(0.2)


def test_reads_waiting_on_an_unreachable_store_resume_when_another_fetch_succeeds(relayed_s3, tmp_path):
    """A fetch pausing after connection failures wakes when any fetch succeeds: its own pause here
    would last 5-10 s (backoff 10 s, no short cap), it resumes within 3 s of the other's success."""
    store, relayed, proxy = relayed_s3
    first, second = b"first chunk" * 100, b"second chunk" * 100
    shas = [hashlib.sha256(d).digest() for d in (first, second)]
    for sha, data in zip(shas, (first, second), strict=True):
        store.put(chunk_key(sha), zstandard.ZstdCompressor().compress(data))
    fetcher = ChunkFetcher(
        [relayed],
        ChunkCache(tmp_path / "cache", 1 << 20),
        retry_seconds=60,
        backoff=10,
        max_backoff=10,
        request_timeout=5,
        unreachable_backoff=30,
    )
    proxy.always("reset")
    thread, done = _fetch_in_thread(fetcher, shas[0], len(first))
    _wait_for_a_failed_round(proxy)
    proxy.clear()
    assert fetcher.read(shas[1], len(second), 0, len(second)) == second
    recovered = time.monotonic()
    thread.join(15)
    assert done and done[0] == first
    assert done[1] - recovered < 3.0, done[1] - recovered


def test_a_lone_read_probes_an_unreachable_store_every_second(relayed_s3, tmp_path):
    """With nothing else fetching, a read after connection failures retries within `unreachable_backoff`
    (1 s), not after the full backoff (5-10 s here), once the store is back."""
    store, relayed, proxy = relayed_s3
    data = b"lone chunk" * 100
    sha = hashlib.sha256(data).digest()
    store.put(chunk_key(sha), zstandard.ZstdCompressor().compress(data))
    fetcher = ChunkFetcher(
        [relayed], ChunkCache(tmp_path / "cache", 1 << 20), retry_seconds=60, backoff=10, max_backoff=10, request_timeout=5
    )
    proxy.always("reset")
    thread, done = _fetch_in_thread(fetcher, sha, len(data))
    _wait_for_a_failed_round(proxy)
    proxy.clear()
    back = time.monotonic()
    thread.join(15)
    assert done and done[0] == data
    assert done[1] - back < 3.0, done[1] - back
