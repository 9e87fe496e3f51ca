"""The FUSE daemon's /metrics and /healthz, scraped from a real daemon around a lazy container start,
and its --log-format json log (every line a JSON object)."""

from __future__ import annotations

import json
import socket
import sys
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from layerstore.procs import spawn, wait_for_socket
from snapshotter.localnode import start_containerd, start_snapshotter
from tests.remote.conftest import Stack, convert, liftoff_pull, stop_fused

RUN = ["/app/run.sh"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def health(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def metrics_stack(tmp_path_factory, store_url):
    """fused with --metrics-address and --log-format json (as the DaemonSet runs it), its snapshotter, containerd."""
    workdir = tmp_path_factory.mktemp("metrics-stack")
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "liftoff",
        "--log-level",
        "info",
        "--log-format",
        "json",
        "fused",
        "--root",
        str(workdir / "root" / "remote"),
        "--store",
        store_url,
        "--metrics-address",
        f"127.0.0.1:{port}",
    ]
    fused = spawn("fused", argv, workdir)
    wait_for_socket(workdir / "root" / "remote" / "fused.sock", fused, 30)
    socket_path = workdir / "run" / "snapshotter.sock"
    extra = ["--store", store_url, "--no-start-fused"]
    snap = start_snapshotter(workdir / "root", socket_path, workdir=workdir, extra_args=extra)
    ctd = start_containerd(workdir / "containerd", socket_path)
    stack = Stack(workdir, store_url, snap, ctd)
    yield stack, port, fused
    stack.containerd.stop()
    stack.snapshotter.stop()
    stop_fused(stack.fused())
    fused.process.wait(30)


def test_metrics_move_with_a_lazy_start(metrics_stack, conformance_image):
    stack, port, _fused = metrics_stack
    assert health(port) == (200, "ok\n")
    before = scrape(port)
    assert before[("liftoff_fused_views", ())] == 0
    convert(conformance_image, stack.store_url)
    liftoff_pull(stack, conformance_image.ref)
    out = stack.containerd.ctr("run", "--rm", "--snapshotter", "liftoff", conformance_image.ref, "metrics-run", *RUN)
    assert out.startswith("lazily started")
    after = scrape(port)
    store = (("store", stack.store_url),)
    assert after[("liftoff_fused_chunk_fetches_total", store)] > 0
    assert after[("liftoff_fused_chunk_fetched_bytes_total", store)] > 0
    assert (
        after[("liftoff_fused_store_request_duration_seconds_count", (("outcome", "ok"), *store))]
        == (after[("liftoff_fused_chunk_fetches_total", store)])
    )
    assert after[("liftoff_fused_cache_misses_total", ())] >= after[("liftoff_fused_chunk_fetches_total", store)]
    assert after[("liftoff_fused_views", ())] >= 1
    assert after[("liftoff_fused_requests_total", (("opcode", "lookup"),))] > 0
    assert after[("liftoff_fused_requests_total", (("opcode", "read"),))] > 0
    assert after[("liftoff_fused_eio_replies_total", ())] == 0
    assert after[("liftoff_fused_cache_bytes", ())] > 0
    assert after[("liftoff_fused_cache_hits_total", ())] > 0  # small files share chunks: later reads hit
    # a second start shares the view (and the kernel's page cache): nothing more is fetched
    stack.containerd.ctr("run", "--rm", "--snapshotter", "liftoff", conformance_image.ref, "metrics-run-2", *RUN)
    again = scrape(port)
    assert again[("liftoff_fused_chunk_fetches_total", store)] == after[("liftoff_fused_chunk_fetches_total", store)]


def test_health_fails_when_the_control_socket_is_gone(metrics_stack):
    stack, port, _fused = metrics_stack
    sock = stack.root / "remote" / "fused.sock"
    moved = sock.with_name("fused.sock.moved")
    sock.rename(moved)
    try:
        status, reason = health(port)
        assert status == 503 and "fused.sock" in reason
    finally:
        moved.rename(sock)
    assert health(port) == (200, "ok\n")


def test_json_log_lines(metrics_stack):
    _stack, _port, fused = metrics_stack
    lines = [line for line in fused.log_path.read_text().splitlines() if line.strip()]
    assert lines
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert any("serving" in e["message"] for e in entries)
