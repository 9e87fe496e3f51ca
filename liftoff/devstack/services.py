"""Real services on loopback for the demo, the tests and the benchmarks (dev tooling, not the product).

Debian's docker-registry (a real OCI registry), an S3 server speaking the real S3
protocol (moto in server mode) and nginx, each a child process with its own state
directory and log file; skopeo pushes OCI layouts. containerd and the liftoff
daemons start through snapshotter.localnode.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from layerstore.errors import LiftoffError
from layerstore.procs import Service, spawn


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float = 30.0, process: subprocess.Popen | None = None, ok=(200, 401, 403, 404)) -> None:
    """Poll `url` until it answers with one of `ok`; fail early if `process` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise LiftoffError(f"{url}: the server exited with code {process.returncode} before it was ready")
        try:
            if requests.get(url, timeout=2).status_code in ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise LiftoffError(f"{url} did not come up within {timeout:.0f} s")


@dataclass
class Registry:
    """A docker-registry on loopback: `host` is host:port for references."""

    service: Service
    host: str
    root: Path
    htpasswd: tuple[str, str] | None = None

    def blob_gets(self) -> int:
        """Blob GETs in the access log so far (what a lazy pull must not do)."""
        return sum(1 for line in self.service.log().splitlines() if '"GET /v2/' in line and "/blobs/sha256:" in line)

    def stop(self) -> None:
        self.service.stop()


def start_registry(
    workdir: str | os.PathLike[str],
    credentials: tuple[str, str] | None = None,
    port: int | None = None,
    auth_config: str | None = None,
) -> Registry:
    """Start Debian's docker-registry on 127.0.0.1 with storage under `workdir`.

    `credentials` turns on htpasswd basic auth; `auth_config` is a raw `auth:` YAML section.
    """
    binary = shutil.which("docker-registry")
    if not binary:
        raise LiftoffError("docker-registry is not installed (apt-get install docker-registry)")
    workdir = Path(workdir)
    port = port or free_port()
    root = workdir / "storage"
    root.mkdir(parents=True, exist_ok=True)
    auth = ""
    if credentials:
        htpasswd = workdir / "htpasswd"
        hashed = subprocess.run(["htpasswd", "-Bbn", *credentials], check=True, capture_output=True, text=True).stdout
        htpasswd.write_text(hashed)
        auth = f"auth:\n  htpasswd:\n    realm: liftoff\n    path: {htpasswd}\n"
    elif auth_config:
        auth = auth_config
    config = workdir / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: info\n  accesslog:\n    disabled: false\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n" + auth
    )
    service = spawn("registry", [binary, "serve", str(config)], workdir)
    wait_for_http(f"http://127.0.0.1:{port}/v2/", process=service.process)
    return Registry(service, f"127.0.0.1:{port}", root, credentials)


@dataclass
class S3Server:
    """An S3 server on loopback (moto server mode) with fixed test credentials."""

    service: Service
    endpoint: str

    def env(self) -> dict[str, str]:
        """Environment for boto3 clients (and child processes) to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": "liftoff",
            "AWS_SECRET_ACCESS_KEY": "liftoff-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def client(self):
        import boto3

        env = self.env()
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def stop(self) -> None:
        self.service.stop()


def start_s3(workdir: str | os.PathLike[str], port: int | None = None) -> S3Server:
    """Start moto's S3 server on 127.0.0.1."""
    port = port or free_port()
    service = spawn("s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], Path(workdir))
    endpoint = f"http://127.0.0.1:{port}"
    wait_for_http(endpoint + "/moto-api/", process=service.process, timeout=60)
    return S3Server(service, endpoint)


def push_layout(
    layout: str | os.PathLike[str],
    tag: str,
    registry: str,
    repository: str,
    credentials: tuple[str, str] | None = None,
    docker_format: bool = False,
) -> str:
    """Push oci:LAYOUT:TAG to registry/repository:tag with skopeo; returns the reference.

    Digests are preserved, or with `docker_format` skopeo rewrites the manifest
    as Docker v2 schema 2 (the layer blobs stay the same).
    """
    reference = f"{registry}/{repository}:{tag}"
    argv = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--all"]
    argv += ["--format", "v2s2"] if docker_format else ["--preserve-digests"]
    if credentials:
        argv += ["--dest-creds", f"{credentials[0]}:{credentials[1]}"]
    argv += [f"oci:{layout}:{tag}", f"docker://{reference}"]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise LiftoffError(f"skopeo copy to {reference} failed: {done.stderr.strip()}")
    return reference


@dataclass
class Nginx:
    """Debian's nginx serving a directory on loopback; a file:// store directory read as path-style S3 (/bucket/key)."""

    process: subprocess.Popen
    port: int
    workdir: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_nginx(root: str | os.PathLike[str], workers: int = 2) -> Nginx:
    """nginx serving `root` on 127.0.0.1 with Range support and no logs: GET /bucket/key answers
    boto3's GetObject (and Range reads) for a file:// store kept under root/bucket/ (moto re-reads
    whole objects per range, so throughput benchmarks use this)."""
    import tempfile

    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(binary):
        raise LiftoffError("nginx is not installed: apt-get install nginx (scripts/bootstrap does)")
    workdir = Path(tempfile.mkdtemp(prefix="liftoff-nginx-"))
    port = free_port()
    temp = "\n".join(f"  {k}_temp_path {workdir}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (workdir / "nginx.conf").write_text(
        f"""user root;
worker_processes {workers};
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000;
  keepalive_timeout 120;
  types {{ }}
  default_type application/octet-stream;
{temp}
  server {{
    listen 127.0.0.1:{port};
    root {Path(root).absolute()};
    location / {{ }}
  }}
}}
"""
    )
    process = subprocess.Popen([binary, "-p", str(workdir), "-c", str(workdir / "nginx.conf")], stderr=subprocess.DEVNULL)
    wait_for_http(f"http://127.0.0.1:{port}/", process=process, ok=(200, 403, 404))
    return Nginx(process, port, workdir)
