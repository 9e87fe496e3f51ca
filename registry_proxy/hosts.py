"""containerd's registry host configuration (certs.d/<registry>/hosts.toml) that puts the proxy in front of each upstream.

containerd (1.5+; CRI's `config_path`, or `ctr image pull --hosts-dir`) tries each [host] mirror first with
`?ns=<registry>` added to every request, then falls back to `server`, the upstream itself.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from layerstore.errors import LiftoffError
from registry_proxy.config import Upstream


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def check_proxy_url(url: str) -> str:
    """The proxy's URL as clients reach it: http(s)://HOST[:PORT]."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise LiftoffError(f"--proxy-url {url!r}: expected http(s)://HOST[:PORT], the address nodes reach the proxy at")
    return f"{parts.scheme}://{parts.netloc}"


def hosts_toml(upstream: Upstream, proxy_url: str, ca: str | None = None) -> str:
    """The hosts.toml of one upstream registry."""
    text = (
        f"# {upstream.name}: pull through liftoff proxy at {proxy_url}; containerd falls back to the registry itself.\n"
        f'# Install as <containerd certs.d>/{upstream.name}/hosts.toml (CRI: [plugins."io.containerd.grpc.v1.cri".registry]\n'
        '# config_path = "/etc/containerd/certs.d"; ctr: --hosts-dir). containerd rereads it on every pull.\n'
        f"server = {_toml_string(upstream.url)}\n"
        "\n"
        f"[host.{_toml_string(proxy_url)}]\n"
        '  capabilities = ["pull", "resolve"]\n'
    )
    if ca:
        text += f"  ca = {_toml_string(ca)}\n"
    return text


def write_hosts_dir(directory: Path, upstreams: list[Upstream], proxy_url: str, ca: str | None = None) -> list[Path]:
    """Write DIRECTORY/<registry>/hosts.toml for each upstream; the paths written."""
    written = []
    for upstream in upstreams:
        path = directory / upstream.name / "hosts.toml"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(hosts_toml(upstream, proxy_url, ca))
        except OSError as e:
            raise LiftoffError(f"cannot write {path}: {e.strerror}") from None
        written.append(path)
    return written
