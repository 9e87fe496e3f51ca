"""Network faults, injected by a real proxy between weightstream and the S3 server."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import weightstream
from layerstore.retry import STALL_ATTEMPTS
from tests.silent_server import SilentServer
from tests.weightstream.conftest import assert_same, random_tensor, write_checkpoint
from weightstream.errors import FetchError

FAST_RETRY = {"backoff_base": 0.01, "backoff_max": 0.05, "stall_timeout": 0.5}


@pytest.fixture
def checkpoint_url(tmp_path, s3_prefix, fault_proxy):
    generator = torch.Generator().manual_seed(20)
    tensors = {f"w{i}": random_tensor((200 + i, 250), torch.float32, generator) for i in range(6)}
    write_checkpoint(tmp_path, tensors, shards=2)
    s3_prefix.upload(tmp_path)
    return s3_prefix.url(endpoint=fault_proxy.endpoint), tensors


@pytest.mark.parametrize("fault", ["503", "reset", "truncate", "stall"])
def test_each_fault_is_retried_and_the_load_is_exact(checkpoint_url, fault_proxy, fault):
    url, tensors = checkpoint_url
    with weightstream.open(url, range_size=64 * 1024, concurrency=4, **FAST_RETRY) as checkpoint:
        fault_proxy.inject(fault, fault)
        stream = checkpoint.stream()
        state = dict(stream)
    assert fault_proxy.injected == [fault, fault]
    assert stream.stats.retries >= 2
    assert_same(state, tensors)


def test_a_storm_of_mixed_faults(checkpoint_url, fault_proxy):
    url, tensors = checkpoint_url
    fault_proxy.inject(*(["reset", "503", "truncate", "pass", "stall", "503"] * 4))
    started = time.monotonic()
    state = weightstream.load(url, range_size=64 * 1024, concurrency=6, **FAST_RETRY)
    assert_same(state, tensors)
    assert len([f for f in fault_proxy.injected if f != "pass"]) == 20
    assert time.monotonic() - started < 30


def test_a_stalled_range_resumes_from_the_bytes_already_received(checkpoint_url, fault_proxy):
    url, tensors = checkpoint_url
    with weightstream.open(url, range_size=1 << 20, concurrency=1, **FAST_RETRY) as checkpoint:
        fault_proxy.inject("stall")
        stream = checkpoint.stream()
        state = dict(stream)
    assert_same(state, tensors)
    total = sum(t.numel() * 4 for t in tensors.values())
    assert stream.stats.bytes_fetched == total  # the re-request asked only for the missing tail (counted once)
    assert stream.stats.retries == 1


def test_persistent_503_fails_with_a_clear_error_and_returns_nothing(checkpoint_url, fault_proxy):
    url, _ = checkpoint_url
    with weightstream.open(url, range_size=64 * 1024, concurrency=2, max_retries=3, **FAST_RETRY) as checkpoint:
        fault_proxy.always("503")
        result = None
        with pytest.raises(FetchError) as error:
            result = checkpoint.load()
        assert result is None
        message = str(error.value)
        assert "model-0000" in message and "503 SlowDown" in message and "after 3 retries" in message
        delivered = []
        with pytest.raises(FetchError):
            for name, _ in checkpoint:
                delivered.append(name)
        assert delivered == []
        fault_proxy.clear()
        assert len(checkpoint.load()) == 6  # the same checkpoint object recovers once the server does


def test_stopping_early_aborts_reads_promptly(checkpoint_url, fault_proxy):
    url, _ = checkpoint_url
    fault_proxy.stall_seconds = 20
    with weightstream.open(url, range_size=64 * 1024, concurrency=1, stall_timeout=30) as checkpoint:
        # w0 (200 KB) arrives in four 64 KiB ranges; the fifth, dispatched before w0 is handed out, hangs
        fault_proxy.inject(*(["pass"] * 4), *(["stall"] * 50))
        stream = iter(checkpoint.stream())
        name, _ = next(stream)
        assert name == "w0"
        time.sleep(0.3)  # let the next read reach the stalled server
        assert "stall" in fault_proxy.injected
        started = time.monotonic()
        stream.close()  # the consumer stops: the read blocked in recv() must end now, not in 20-30 s
        assert time.monotonic() - started < 3
    fault_proxy.clear()


@pytest.fixture
def silent_server():
    server = SilentServer()
    yield server
    server.stop()


@pytest.mark.parametrize("name", ["", "model.safetensors", "model.safetensors.index.json"])
def test_an_endpoint_that_never_answers_fails_within_a_few_stall_timeouts(silent_server, name):
    """The HEAD (directory URL), the ranged header GET (object URL) and the index read (index URL) all
    honour stall_timeout: the load fails in about STALL_ATTEMPTS x stall_timeout with one clear line."""
    stall = 1.0
    url = f"s3://bucket/llama/{name}?endpoint_url={silent_server.endpoint}&path_style=true"
    outcome: list[BaseException] = []

    def load() -> None:
        try:
            weightstream.load(url, stall_timeout=stall, connect_timeout=stall, backoff_base=0.01, backoff_max=0.05)
        except BaseException as e:
            outcome.append(e)

    started = time.monotonic()
    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=STALL_ATTEMPTS * stall + 5)
    elapsed = time.monotonic() - started
    assert not worker.is_alive(), f"still waiting after {elapsed:.0f} s for a server that never answers"
    assert len(outcome) == 1 and isinstance(outcome[0], FetchError), outcome
    message = str(outcome[0])
    assert "\n" not in message and f"s3://bucket/llama/{name or 'model.safetensors.index.json'}" in message
    assert "1 s, 3 times" in message and "check the endpoint" in message, message
    assert elapsed >= STALL_ATTEMPTS * stall * 0.9  # it did wait for each attempt's answer
    assert silent_server.connections >= 1
