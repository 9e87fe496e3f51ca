"""Helpers for the proxy tests: `liftoff proxy` as a child process, test images pushed to a real registry."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from liftoff.devstack.ocibuild import LayoutWriter, Member, make_tar
from liftoff.devstack.services import free_port, push_layout, wait_for_http
from tests.conftest import ROOT

OCI_ACCEPT = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"


@dataclass
class Proxy:
    """A running `liftoff proxy` child process."""

    process: subprocess.Popen
    port: int
    cache_dir: Path
    log_path: Path
    argv: list[str] = field(default_factory=list)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def get(self, path: str, ns: str | None = None, method: str = "GET", **kwargs) -> requests.Response:
        params = kwargs.pop("params", {})
        if ns:
            params["ns"] = ns
        return requests.request(method, self.url + path, params=params, timeout=kwargs.pop("timeout", 30), **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def access(self) -> list[str]:
        """The access log lines so far."""
        return [line for line in self.log().splitlines() if "registry_proxy.access:" in line]

    def conversions(self) -> dict:
        return requests.get(self.url + "/liftoff/v1/conversions", timeout=10).json()

    def job(self, digest: str) -> dict | None:
        return next((j for j in self.conversions()["jobs"] if j["digest"] == digest), None)

    def wait_job(self, digest: str, states=("done", "failed"), timeout: float = 90.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(digest)
            if job and job["state"] in states:
                return job
            time.sleep(0.2)
        raise AssertionError(f"conversion of {digest} not {states} within {timeout} s: {self.job(digest)}\n{self.log()[-3000:]}")

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample on /metrics (0 if absent)."""
        text = requests.get(self.url + "/metrics", timeout=10).text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            metric, _, rest = key.partition("{")
            found = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
            if metric == name and found == want:
                return float(value)
        return 0.0

    def stop(self, kill: bool = False) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_proxy(
    workdir: Path, upstreams: list[tuple[str, str]], *extra: str, env: dict | None = None, port: int | None = None
) -> Proxy:
    """`liftoff proxy` on a free loopback port; `upstreams` are (name, url) pairs, http URLs get --plain-http."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cache_dir = workdir / "cache"
    argv = [sys.executable, "-m", "liftoff", "proxy", "--listen", f"127.0.0.1:{port}", "--cache-dir", str(cache_dir)]
    for name, url in upstreams:
        argv += ["--upstream", f"{name}={url}"] + (["--plain-http", name] if url.startswith("http://") else [])
    argv += ["--log-level", "info", *extra]
    log_path = workdir / "proxy.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, env={**os.environ, **(env or {})}
        )
    proxy = Proxy(process, port, cache_dir, log_path, argv)
    try:
        wait_for_http(f"{proxy.url}/v2/", process=process, timeout=30)
    except Exception:
        proxy.stop()
        raise AssertionError(f"liftoff proxy did not start:\n{log_path.read_text()[-3000:]}") from None
    return proxy


@dataclass
class TestImage:
    """An image pushed to a registry: its reference, manifest and blobs."""

    ref: str
    repository: str
    tag: str
    manifest_digest: str
    manifest: bytes
    config_digest: str
    layer_digests: list[str]
    blobs: dict[str, bytes]

    def blob_path(self, digest: str) -> str:
        return f"/v2/{self.repository}/blobs/{digest}"


def push_image(
    registry_host: str,
    workdir: Path,
    repository: str,
    sizes: list[int],
    tag: str = "v1",
    credentials: tuple[str, str] | None = None,
    seed: str = "",
) -> TestImage:
    """An image of random layers (one file of each size, stored uncompressed so blob sizes are known) pushed with skopeo."""
    layout = workdir / f"layout-{repository.replace('/', '-')}-{tag}"
    writer = LayoutWriter(layout)
    rng = random.Random(seed or f"{repository}:{tag}")  # the same seed gives the same blobs
    layers = [make_tar([Member("data", "dir"), Member(f"data/f{i}", data=rng.randbytes(size))]) for i, size in enumerate(sizes)]
    descriptor = writer.add_image(layers, config={"Cmd": ["/bin/sh"]}, compression="none")
    writer.tag(descriptor, tag)
    ref = push_layout(layout, tag, registry_host, repository, credentials=credentials)
    manifest = (layout / "blobs" / "sha256" / descriptor["digest"].split(":")[1]).read_bytes()
    doc = json.loads(manifest)
    blobs = {}
    for desc in [doc["config"], *doc["layers"]]:
        blobs[desc["digest"]] = (layout / "blobs" / "sha256" / desc["digest"].split(":")[1]).read_bytes()
    return TestImage(
        ref, repository, tag, descriptor["digest"], manifest, doc["config"]["digest"], [d["digest"] for d in doc["layers"]], blobs
    )


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def registry_gets(registry, digest: str) -> int:
    """GETs of one blob in a docker-registry's access log."""
    return sum(1 for line in registry.service.log().splitlines() if '"GET /v2/' in line and f"/blobs/{digest}" in line)


def cached_files(proxy: Proxy) -> set[str]:
    """Digests of the blobs in the proxy's disk cache."""
    return {"sha256:" + p.name for p in (proxy.cache_dir / "blobs" / "sha256").glob("*/*")}


def wait_cached(proxy: Proxy, digests, timeout: float = 10.0) -> None:
    """Until the blobs are in the disk cache (they are fsynced and renamed after the last byte is sent)."""
    deadline = time.monotonic() + timeout
    while not set(digests) <= cached_files(proxy):
        assert time.monotonic() < deadline, f"not cached: {set(digests) - cached_files(proxy)}"
        time.sleep(0.05)
