"""The chunk fetcher and cache: verification, fall-through, single flight, eviction, torn files."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest
import zstandard

from layerstore.cache import ChunkCache
from layerstore.fetch import ChunkFetcher, ChunkUnavailable
from layerstore.layout import chunk_key
from layerstore.stores import FileStore, open_store
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
