#!/usr/bin/env python3
"""Registry proxy blob throughput: directly from the registry, through the proxy cold, and cached, side by side.

    scripts/bench proxy [--blobs 4] [--blob-mib 256] [--runs 3] [--settings unshaped,shaped]

Debian's docker-registry on loopback holds `--blobs` random blobs of `--blob-mib` MiB (incompressible).
Per run, with a fresh proxy (empty cache), the same client (curl, output to /dev/null) downloads every
blob, all at once (as containerd does, three to four layers in parallel) and then one at a time:

  direct:  from the registry
  cold:    through the proxy, which fetches upstream, verifies the digest, writes and fsyncs its cache
  cached:  through the proxy again, served from its disk cache (sendfile on a pool of threads)

Settings: `unshaped` (registry and proxy both on loopback: the proxy's own CPU cost is all there is) and
`shaped` (the registry is remote, behind benchmarks/shaping_proxy.py with 20 ms per request, 100 MB/s per
connection and 1 GB/s in all, for direct and for the proxy's upstream alike; the proxy is near its
clients, as a regional mirror is). Reported: MB/s (median, min-max over runs) and the ratio to direct.
Targets: cold >= 80% of direct, cached >= direct. Blobs sit in the page cache in every mode.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import requests

from benchmarks.benchlib import load_average, machine, table
from benchmarks.shaping_proxy import SHAPED, UNSHAPED, ProxyProcess
from liftoff.devstack.services import free_port, start_registry, wait_for_http

WORK = Path("/var/tmp/liftoff-bench/proxy")
REPOSITORY = "bench/blobs"


def push_blobs(registry_host: str, count: int, size: int) -> list[str]:
    """Random blobs pushed with monolithic uploads; their digests."""
    digests = []
    for _ in range(count):
        data = os.urandom(size)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        start = requests.post(f"http://{registry_host}/v2/{REPOSITORY}/blobs/uploads/", timeout=30)
        location = start.headers.get("Location", "")
        if start.status_code != 202 or not location:
            raise SystemExit(f"starting an upload failed: {start.status_code} {start.text[:200]}")
        url = location if location.startswith("http") else f"http://{registry_host}{location}"
        put = requests.put(url, params={"digest": digest}, data=data, timeout=300)
        if put.status_code != 201:
            raise SystemExit(f"pushing a blob failed: {put.status_code} {put.text[:200]}")
        digests.append(digest)
    return digests


def curl(url: str) -> tuple[int, float]:
    """(bytes, seconds) of one download to /dev/null."""
    done = subprocess.run(
        ["curl", "-sf", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url],
        capture_output=True,
        text=True,
        check=True,
    )
    size, seconds = done.stdout.split()
    return int(size), float(seconds)


def download(base: str, digests: list[str], parallel: bool) -> float:
    """MB/s for all blobs, all at once or one after another (wall clock over all bytes)."""
    urls = [f"{base}/v2/{REPOSITORY}/blobs/{d}" for d in digests]
    started = time.monotonic()
    if parallel:
        with ThreadPoolExecutor(len(urls)) as pool:
            sizes = [size for size, _ in pool.map(curl, urls)]
    else:
        sizes = [curl(url)[0] for url in urls]
    return sum(sizes) / (time.monotonic() - started) / 1e6


def start_proxy(registry_host: str, upstream_host: str, cache: Path) -> subprocess.Popen:
    """A fresh proxy (empty cache) for `registry_host`, fetching from `upstream_host` (the registry or its shaper)."""
    if cache.exists():
        shutil.rmtree(cache)
    port = free_port()
    argv = [sys.executable, "-m", "liftoff", "proxy", "--listen", f"127.0.0.1:{port}", "--cache-dir", str(cache)]
    argv += ["--upstream", f"{registry_host}=http://{upstream_host}", "--plain-http", registry_host, "--log-level", "warning"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    process.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    wait_for_http(process.url + "/v2/", process=process)  # type: ignore[attr-defined]
    return process


def wait_cached(cache: Path, digests: list[str], timeout: float = 60) -> None:
    """The cold run ends when clients have their bytes; the cache's fsync+rename may trail by a moment."""
    deadline = time.monotonic() + timeout
    want = {d.split(":")[1] for d in digests}
    while {p.name for p in (cache / "blobs" / "sha256").glob("*/*")} < want:
        if time.monotonic() > deadline:
            raise SystemExit("the proxy did not cache the blobs")
        time.sleep(0.05)


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def measure(
    registry_host: str, upstream_host: str, digests: list[str], runs: int, results: dict[str, list[float]], setting: str
) -> None:
    """`runs` rounds of direct, cold and cached downloads, parallel and sequential, into `results`."""
    direct = f"http://{upstream_host}"
    download(direct, digests, parallel=True)  # the registry's files into the page cache
    for run in range(runs):
        for parallel in (True, False):
            mode = "parallel" if parallel else "sequential"
            proxy = start_proxy(registry_host, upstream_host, WORK / "cache")
            try:
                results.setdefault(f"{setting} direct {mode}", []).append(download(direct, digests, parallel))
                results.setdefault(f"{setting} cold {mode}", []).append(download(proxy.url, digests, parallel))  # type: ignore[attr-defined]
                wait_cached(WORK / "cache", digests)
                results.setdefault(f"{setting} cached {mode}", []).append(download(proxy.url, digests, parallel))  # type: ignore[attr-defined]
            finally:
                proxy.terminate()
                proxy.wait()
        print(f"{setting}: run {run + 1}/{runs} done", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blobs", type=int, default=4)
    parser.add_argument("--blob-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--settings", default="unshaped,shaped", help="comma-separated: unshaped, shaped")
    parser.add_argument("--json", action="store_true", help="print the raw numbers as JSON too")
    args = parser.parse_args()
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if shutil.which("curl") is None:
        raise SystemExit("curl is needed (apt-get install curl)")
    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True)
    load_before = load_average()
    registry = start_registry(WORK / "registry")
    results: dict[str, list[float]] = {}
    try:
        digests = push_blobs(registry.host, args.blobs, args.blob_mib << 20)
        for setting in settings:
            host, port = registry.host.split(":")
            with ProxyProcess((host, int(port)), SHAPED if setting == "shaped" else UNSHAPED) as shaper:
                upstream = f"127.0.0.1:{shaper.port}" if setting == "shaped" else registry.host
                measure(registry.host, upstream, digests, args.runs, results, setting)
    finally:
        registry.stop()
        shutil.rmtree(WORK, ignore_errors=True)  # random blobs: nothing worth keeping
    rows = []
    for setting in settings:
        label = SHAPED.label if setting == "shaped" else "unshaped (loopback)"
        for mode in ("parallel", "sequential"):
            base = statistics.median(results[f"{setting} direct {mode}"])
            for source in ("direct", "cold", "cached"):
                values = results[f"{setting} {source} {mode}"]
                rows.append([label, source, mode, summary(values), f"{statistics.median(values) / base:.2f}"])
    total_mib = args.blobs * args.blob_mib
    print(f"# Registry proxy blob throughput ({date.today()}, {machine()})")
    print(f"# {args.blobs} blobs x {args.blob_mib} MiB = {total_mib} MiB per download set, curl to /dev/null, {args.runs} runs")
    print(f"# load average (1 min) before: {load_before:.2f}, after: {load_average():.2f}")
    print(table(["upstream", "source", "clients", "MB/s median (min-max)", "vs direct"], rows))
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
