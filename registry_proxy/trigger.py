"""Convert on first pull: a served image manifest or index not yet converted is queued for conversion.

An index is queued with the platforms the proxy converts (--platform); its chosen children are marked
as covered, so pulling them next (as every client does) queues nothing more. A child of a platform not
chosen, pulled by digest, is queued on its own: what nodes actually pull gets converted. Indexes and
platforms are read by the one OCI model (layerstore.oci.manifest, layerstore.oci.platform).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from layerstore.errors import ImageError
from layerstore.oci.manifest import Index, parse_document
from layerstore.oci.platform import Platform, parse_platforms
from registry_proxy.manifests import Manifest
from registry_proxy.queue import ConversionQueue

log = logging.getLogger(__name__)


def wanted(platform: Platform | None, platforms: list[Platform] | None) -> bool:
    """Whether an index entry's platform is one to convert: a runnable one matching any of `platforms` (None: all)."""
    if platforms is None:
        return platform is None or platform.runnable
    return any(p.matches(platform) for p in platforms)


class ConversionTrigger:
    """Decides what a served manifest queues; `wake()` tells the workers."""

    def __init__(self, queue: ConversionQueue, platforms: list[str], wake: Callable[[], None]) -> None:
        self.queue = queue
        self.platforms = parse_platforms(platforms)
        self.wake = wake

    def manifest_served(self, upstream: str, repository: str, tag: str | None, manifest: Manifest) -> None:
        try:
            document = parse_document(manifest.body, manifest.media_type, manifest.digest)
        except ImageError as e:
            log.debug("not converting %s/%s@%s: %s", upstream, repository, manifest.digest, e)
            return
        children: list[str] = []
        if isinstance(document, Index):
            # chosen manifests, and nested indexes that may hold some (the conversion follows them)
            children = [
                m.digest
                for m in document.manifests
                if wanted(m.platform, self.platforms) or (m.is_index and (m.platform is None or self.platforms is None))
            ]
            if not children:
                log.debug(
                    "not converting index %s/%s@%s: no manifest for %s", upstream, repository, manifest.digest, self.platforms
                )
                return
        if self.queue.enqueue(upstream, repository, tag, manifest.digest, document.media_type, children):
            log.info("queued conversion of %s/%s%s@%s", upstream, repository, f":{tag}" if tag else "", manifest.digest)
            self.wake()
