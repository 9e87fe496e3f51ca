"""Parsing a request into what it asks for, refusing anything that could reach an unconfigured host.

Repository names, tags and digests must match the distribution spec's grammar; the upstream is chosen
only from containerd's `?ns=` parameter (or the default upstream), never from the request's host or path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from registry_proxy.config import ProxyConfig, Upstream
from registry_proxy.errors import ProxyError, denied, name_invalid, unsupported

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
NAME = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
_ANY_DIGEST = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
MAX_NAME = 255


@dataclass(frozen=True)
class Route:
    """kind: base (/v2/), manifest, blob or tags; reference: tag or digest (manifests), digest (blobs)."""

    kind: str
    repository: str = ""
    reference: str = ""

    @property
    def by_digest(self) -> bool:
        return bool(DIGEST.match(self.reference))


def parse_route(method: str, raw_path: str, path: str) -> Route:
    """The route of a /v2/ request; ProxyError for anything malformed, unsupported or not read-only."""
    if not raw_path.startswith("/"):
        raise denied("absolute-form (forward proxy) requests are refused: this is a registry mirror, not an open proxy")
    if "%" in raw_path.replace("%3A", "").replace("%3a", ""):
        raise name_invalid("percent-encoded characters are not allowed in repository names, tags or digests")
    if method not in ("GET", "HEAD"):
        raise unsupported(f"{method} is not supported: the proxy is read-only (push to the upstream registry)")
    if path in ("/v2", "/v2/"):
        return Route("base")
    if not path.startswith("/v2/"):
        raise ProxyError(404, "UNSUPPORTED", f"{path} is not a distribution API path (/v2/...)")
    rest = path[len("/v2/") :]
    if rest == "_catalog":
        raise ProxyError(404, "UNSUPPORTED", "the proxy does not list repositories; ask the upstream registry")
    if rest.endswith("/tags/list"):
        return Route("tags", _repository(rest[: -len("/tags/list")]))
    for marker, kind in (("/manifests/", "manifest"), ("/blobs/", "blob")):
        name, sep, reference = rest.rpartition(marker)
        if not sep:
            continue
        repository = _repository(name)
        if kind == "blob" or not TAG.match(reference):
            _check_digest(reference, kind)
        return Route(kind, repository, reference)
    if "/blobs/uploads" in rest:
        raise unsupported("uploads are not supported: the proxy is read-only (push to the upstream registry)")
    raise ProxyError(404, "UNSUPPORTED", f"{path} is not a supported distribution API path")


def _repository(name: str) -> str:
    if len(name) > MAX_NAME or not NAME.match(name):
        raise name_invalid(
            f"invalid repository name {name[:100]!r}: "
            "lowercase components [a-z0-9] joined by '.', '_', '__' or '-', separated by '/'"
        )
    return name


def _check_digest(reference: str, kind: str) -> None:
    if DIGEST.match(reference):
        return
    if _ANY_DIGEST.match(reference) and not reference.startswith("sha256:"):
        raise ProxyError(
            400, "DIGEST_INVALID", f"unsupported digest algorithm in {reference[:80]!r}: the proxy verifies sha256 only"
        )
    what = "a tag or sha256 digest" if kind == "manifest" else "a sha256:<64 hex> digest"
    code = "MANIFEST_INVALID" if kind == "manifest" else "DIGEST_INVALID"
    raise ProxyError(400, code, f"invalid reference {reference[:80]!r}: expected {what}")


def pick_upstream(config: ProxyConfig, namespaces: list[str]) -> Upstream:
    """The upstream named by containerd's ?ns= (a mirror request), else the default upstream."""
    if not namespaces:
        return config.default
    if len(set(namespaces)) > 1:
        raise denied(f"conflicting ns parameters {sorted(set(namespaces))}: name one upstream registry")
    name = namespaces[0].strip().lower()
    found = config.upstream(name)
    if found is None:
        configured = ", ".join(u.name for u in config.upstreams)
        raise denied(
            f"upstream {name[:100]!r} is not configured in this proxy (configured: {configured}); "
            f"add --upstream {name[:100]}=https://... to proxy it"
        )
    return found
