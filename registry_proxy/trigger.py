"""Convert on first pull: a served image manifest or index not yet converted is queued for conversion.

An index is queued with the platforms the proxy converts (--platform); its chosen children are marked
as covered, so pulling them next (as every client does) queues nothing more. A child of a platform not
chosen, pulled by digest, is queued on its own: what nodes actually pull gets converted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from layerstore.errors import ImageError
from layerstore.oci import mediatypes
from registry_proxy.manifests import Manifest
from registry_proxy.queue import ConversionQueue

log = logging.getLogger(__name__)


def wanted(platform: dict, platforms: list[str]) -> bool:
    """Whether an index entry's platform is one to convert (os/arch matches os/arch/variant too)."""
    if platform.get("os") == "unknown":  # attestations, not runnable images
        return False
    text = "/".join(str(platform.get(k, "")) for k in ("os", "architecture", "variant") if platform.get(k))
    return not platforms or any(text == p or (p.count("/") == 1 and text.startswith(p + "/")) for p in platforms)


class ConversionTrigger:
    """Decides what a served manifest queues; `wake()` tells the workers."""

    def __init__(self, queue: ConversionQueue, platforms: list[str], wake: Callable[[], None]) -> None:
        self.queue = queue
        self.platforms = platforms
        self.wake = wake

    def manifest_served(self, upstream: str, repository: str, tag: str | None, manifest: Manifest) -> None:
        try:
            media_type, doc = mediatypes.parse_document(manifest.body, manifest.media_type, manifest.digest)
        except ImageError as e:
            log.debug("not converting %s/%s@%s: %s", upstream, repository, manifest.digest, e)
            return
        children: list[str] = []
        if media_type in mediatypes.INDEXES:
            entries = [m for m in doc["manifests"] if isinstance(m, dict) and isinstance(m.get("digest"), str)]
            children = [m["digest"] for m in entries if wanted(m.get("platform") or {}, self.platforms)]
            if not children:
                log.debug(
                    "not converting index %s/%s@%s: no manifest for %s", upstream, repository, manifest.digest, self.platforms
                )
                return
        if self.queue.enqueue(upstream, repository, tag, manifest.digest, media_type, children):
            log.info("queued conversion of %s/%s%s@%s", upstream, repository, f":{tag}" if tag else "", manifest.digest)
            self.wake()
