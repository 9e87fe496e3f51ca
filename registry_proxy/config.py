"""The proxy's configuration: upstream registries (explicit, never open), cache, conversion."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from layerstore.errors import LiftoffError
from layerstore.oci.mediatypes import MAX_MANIFEST_BYTES
from layerstore.oci.platform import host_platform

DEFAULT_LISTEN = "127.0.0.1:5050"
DEFAULT_CACHE_DIR = "/var/lib/liftoff/proxy"
DEFAULT_CACHE_SIZE = "20G"

# A registry host as clients name it (containerd's `ns`): host[:port] or [v6]:port, lowercase.
_HOST = re.compile(
    r"^(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*|\[[0-9a-f:.]+\])(?::\d{1,5})?$"
)


@dataclass(frozen=True)
class Upstream:
    """One upstream registry: `name` is the host clients pull from, `url` where the proxy fetches it."""

    name: str  # e.g. docker.io, 127.0.0.1:5000
    url: str  # scheme://host[:port], no path
    pass_credentials: bool = False  # forward a client's Authorization to this upstream

    @property
    def host(self) -> str:
        """host[:port] of the URL (what a docker config file keys credentials by)."""
        return urlsplit(self.url).netloc


@dataclass
class ProxyConfig:
    """Everything `liftoff proxy` runs with."""

    upstreams: list[Upstream]
    listen: str = DEFAULT_LISTEN
    default_upstream: str | None = None  # for requests without containerd's ?ns= (skopeo, liftoff pull)
    cache_dir: Path = Path(DEFAULT_CACHE_DIR)
    cache_size: int = 20 << 30
    tag_ttl: float = 60.0
    upstream_timeout: float = 30.0  # connect, and silence while reading
    fetch_timeout: float | None = None  # one whole blob download (None: scaled from its size)
    docker_config: str | None = None
    stores: list[str] = field(default_factory=list)
    store_options: dict = field(default_factory=dict)
    convert_workers: int = 1
    convert_retries: int = 5
    retry_backoff: float = 10.0
    convert_timeout: float = 3600.0
    platforms: list[str] = field(default_factory=lambda: [str(host_platform())])
    max_manifest_bytes: int = MAX_MANIFEST_BYTES

    def upstream(self, name: str) -> Upstream | None:
        return next((u for u in self.upstreams if u.name == name), None)

    @property
    def default(self) -> Upstream:
        """The upstream for requests that do not name one."""
        found = self.upstream(self.default_upstream) if self.default_upstream else self.upstreams[0]
        assert found is not None
        return found


def parse_upstreams(
    specs: list[str], plain_http: list[str] | None = None, pass_credentials: list[str] | None = None
) -> list[Upstream]:
    """Upstreams from NAME=URL specs; a URL without a scheme is https (http with --plain-http NAME)."""
    plain = set(plain_http or [])
    passing = set(pass_credentials or [])
    upstreams: list[Upstream] = []
    for spec in specs:
        name, sep, url = spec.partition("=")
        name = name.strip().lower()
        if not sep or not name or not url:
            raise LiftoffError(f"--upstream {spec!r}: expected NAME=URL, e.g. docker.io=https://registry-1.docker.io")
        if not _HOST.match(name):
            raise LiftoffError(f"--upstream {spec!r}: {name!r} is not a registry host name (host[:port], as in image references)")
        if "://" not in url:
            url = ("http://" if name in plain else "https://") + url
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise LiftoffError(f"--upstream {spec!r}: the URL must be http(s)://HOST[:PORT]")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
            raise LiftoffError(f"--upstream {spec!r}: give only scheme://HOST[:PORT] (no path, query or credentials)")
        if parts.scheme == "http" and name not in plain:
            raise LiftoffError(f"--upstream {spec!r} is plain HTTP; pass --plain-http {name} to allow it (loopback registries)")
        if any(u.name == name for u in upstreams):
            raise LiftoffError(f"--upstream {name} is given twice")
        upstreams.append(Upstream(name, f"{parts.scheme}://{parts.netloc}", name in passing))
    if not upstreams:
        raise LiftoffError("no upstream registry: pass --upstream NAME=URL (e.g. docker.io=https://registry-1.docker.io)")
    for flag, names in (("--plain-http", plain), ("--pass-credentials", passing)):
        unknown = names - {u.name for u in upstreams}
        if unknown:
            raise LiftoffError(f"{flag} {', '.join(sorted(unknown))}: no such --upstream")
    return upstreams


def parse_listen(address: str) -> tuple[str, int]:
    """(host, port) from HOST:PORT, [V6]:PORT or :PORT (all interfaces)."""
    hostname, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise LiftoffError(f"bad --listen {address!r}: expected HOST:PORT or :PORT, e.g. 127.0.0.1:5050")
    return hostname.strip("[]") or "0.0.0.0", int(port)
