"""Real services on loopback for the demo, the tests and the benchmarks.

Debian's docker-registry (a real OCI registry) and an S3 server speaking the
real S3 protocol (moto in server mode), each a child process with its own
state directory and log file.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from layerstore.errors import LiftoffError


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
class Service:
    """A child process with a log file; stop() ends it."""

    name: str
    process: subprocess.Popen
    log_path: Path
    extra: dict = field(default_factory=dict)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _spawn(name: str, argv: list[str], workdir: Path, env: dict | None = None) -> Service:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    return Service(name, process, log_path)


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
    service = _spawn("registry", [binary, "serve", str(config)], workdir)
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
    service = _spawn("s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], Path(workdir))
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


def _wait_for_socket(path: Path, service: Service, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise LiftoffError(
                f"{service.name} exited with code {service.process.returncode} before it was ready; log {service.log_path}:\n"
                + service.log()[-2000:]
            )
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(path))
                return
            except OSError:
                pass
        time.sleep(0.05)
    service.stop()
    raise LiftoffError(f"{service.name} did not listen on {path} within {timeout:.0f} s; log {service.log_path}")


def start_snapshotter(
    root: str | os.PathLike[str],
    socket_path: str | os.PathLike[str],
    workdir: str | os.PathLike[str] | None = None,
    metrics: str | None = None,
    log_level: str = "debug",
    timeout: float = 30.0,
    extra_args: list[str] | None = None,
) -> Service:
    """Start `liftoff snapshotter --root ROOT --socket SOCKET [EXTRA_ARGS]` as a child; returns once it listens.

    The log goes to WORKDIR/snapshotter.log (WORKDIR defaults to ROOT's parent).
    `extra` holds "root" and "socket".
    """
    root, socket_path = Path(root).absolute(), Path(socket_path).absolute()
    argv = [sys.executable, "-m", "layerstore.cli", "snapshotter", "--root", str(root), "--socket", str(socket_path)]
    argv += ["--log-level", log_level] + (["--metrics", metrics] if metrics else []) + list(extra_args or [])
    service = _spawn("snapshotter", argv, Path(workdir) if workdir else root.parent)
    service.extra.update(root=root, socket=socket_path)
    _wait_for_socket(socket_path, service, timeout)
    return service


def start_fused(
    root: str | os.PathLike[str],
    args: list[str],
    workdir: str | os.PathLike[str] | None = None,
    log_level: str = "info",
    timeout: float = 30.0,
) -> Service:
    """Start `liftoff fused --root ROOT ARGS` (the FUSE daemon) as a child; returns once it answers.

    The snapshotter of ROOT's parent then attaches to it (`--no-start-fused`)."""
    root = Path(root).absolute()
    argv = [sys.executable, "-m", "layerstore.cli", "--log-level", log_level, "fused", "--root", str(root), *args]
    service = _spawn("fused", argv, Path(workdir) if workdir else root.parent)
    _wait_for_socket(root / "fused.sock", service, timeout)
    return service


@dataclass
class Containerd:
    """Debian's containerd as a child with a private root, state and socket; `ctr()` talks to it."""

    service: Service
    address: str
    root: Path
    state: Path
    config_path: Path

    def ctr(self, *args: str, namespace: str = "default", check: bool = True, timeout: float = 300) -> str:
        """Run `ctr --address ADDRESS --namespace NS ARGS`; returns stdout (raises on failure when `check`)."""
        argv = ["ctr", "--address", self.address, "--namespace", namespace, *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise LiftoffError(f"ctr {' '.join(args)} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def stop(self) -> None:
        self.service.stop()

    def log(self) -> str:
        return self.service.log()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def containerd_config(
    workdir: Path, snapshotter_socket: str | os.PathLike[str] | None, plugin_name: str = "liftoff", cri: bool = False
) -> str:
    """A version 2 containerd config: private root/state/sockets, a snapshot proxy plugin, CRI off unless `cri`.

    With `cri`, the CRI plugin unpacks with the proxy plugin (overlayfs without one), keeps containerd's default
    `disable_snapshot_annotations = true`, and reads CNI from private empty directories, so it starts offline.
    """
    disabled = ["io.containerd.grpc.v1.cri"] if not cri else []
    disabled += [f"io.containerd.snapshotter.v1.{name}" for name in ("btrfs", "zfs", "devmapper", "aufs")]
    quoted = ", ".join(f'"{name}"' for name in disabled)
    text = (
        "version = 2\n"
        f'root = "{workdir / "root"}"\n'
        f'state = "{workdir / "state"}"\n'
        f"disabled_plugins = [{quoted}]\n"
        f'[grpc]\n  address = "{workdir / "containerd.sock"}"\n'
        f'[ttrpc]\n  address = "{workdir / "containerd.sock.ttrpc"}"\n'
        '[debug]\n  level = "info"\n'
    )
    if cri:
        snapshotter = plugin_name if snapshotter_socket is not None else "overlayfs"
        section = '[plugins."io.containerd.grpc.v1.cri"'
        text += (
            f"{section}.containerd]\n"
            f'  snapshotter = "{snapshotter}"\n'
            "  disable_snapshot_annotations = true\n"
            f"{section}.cni]\n"
            f'  bin_dir = "{workdir / "cni" / "bin"}"\n'
            f'  conf_dir = "{workdir / "cni" / "net.d"}"\n'
        )
    if snapshotter_socket is not None:
        text += f'[proxy_plugins]\n  [proxy_plugins.{plugin_name}]\n    type = "snapshot"\n    address = "{snapshotter_socket}"\n'
    return text


def start_containerd(
    workdir: str | os.PathLike[str],
    snapshotter_socket: str | os.PathLike[str] | None = None,
    plugin_name: str = "liftoff",
    timeout: float = 30.0,
    cri: bool = False,
) -> Containerd:
    """Start Debian's containerd with everything under `workdir` and `plugin_name` proxying to the snapshotter socket.

    Start the snapshotter first: containerd does not list images of a snapshotter that was down when it started.
    `cri` turns on the CRI plugin (namespace k8s.io) unpacking with that snapshotter (see containerd_config).
    """
    binary = shutil.which("containerd")
    if not binary or not shutil.which("ctr") or not shutil.which("runc"):
        raise LiftoffError("containerd, ctr and runc are needed (apt-get install containerd runc)")
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "containerd.toml"
    if cri:
        for directory in ("bin", "net.d"):
            (workdir / "cni" / directory).mkdir(parents=True, exist_ok=True)
    config_path.write_text(containerd_config(workdir, snapshotter_socket, plugin_name, cri))
    address = workdir / "containerd.sock"
    service = _spawn("containerd", [binary, "--config", str(config_path)], workdir)
    _wait_for_socket(address, service, timeout)
    return Containerd(service, str(address), workdir / "root", workdir / "state", config_path)


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
