"""`liftoff pull`: pull an image into containerd the way containerd's pull-time unpacker does.

Everything goes through containerd's gRPC API, inside a lease deleted at the end:

1. The index (if any), the manifest and the config go into containerd's content store with the labels
   containerd's own pull sets: `containerd.io/gc.ref.content.{m.<i>,config,l.<i>}` for GC and
   `containerd.io/distribution.source.<host>=<repository>`.
2. Bottom-up, each layer not already unpacked is Prepared through the snapshotter with the labels remote
   snapshotters read (`containerd.io/snapshot.ref` = its chainID, `containerd.io/snapshot/cri.*`). A snapshotter
   that serves the layer remotely answers ALREADY_EXISTS: the layer is done and its blob is never fetched.
   Otherwise the blob is fetched into the content store, applied with containerd's Diff service and committed
   as the chainID; every layer above it is then applied too (DESIGN.md section 3): those are Prepared without
   the remote labels, which a snapshotter handles as ordinary snapshots.
3. `containerd.io/gc.ref.snapshot.<snapshotter>=<top chainID>` on the config and the image record (name ->
   index or manifest) make GC keep the whole chain once the lease is gone.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import urllib3

from layerstore.digests import sha256_digest
from layerstore.errors import ImageError, LiftoffError, RegistryError
from layerstore.oci import mediatypes
from layerstore.oci.manifest import (
    Descriptor,
    Index,
    Manifest,
    Node,
    config_platform,
    image_layers,
    parse_config,
    parse_document,
    select_manifests,
)
from layerstore.oci.platform import host_platform, parse_platform, platform_text
from layerstore.oci.source import RegistrySource, read_blob
from layerstore.units import format_size
from snapshotter.containerd_api import CHUNK, DEFAULT_ADDRESS, Code, ContainerdClient, ContainerdError, descriptor, unique_part

SNAPSHOT_REF = "containerd.io/snapshot.ref"
INHERITED_PREFIX = "containerd.io/snapshot/"  # layer annotations containerd passes on as snapshot labels
CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
CRI_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"
GC_CONTENT = "containerd.io/gc.ref.content."
GC_SNAPSHOT = "containerd.io/gc.ref.snapshot."
DISTRIBUTION_SOURCE = "containerd.io/distribution.source."
UNCOMPRESSED = "containerd.io/uncompressed"
MAX_LABEL = 4096  # containerd refuses a label whose key and value together are longer
MAX_CONFIG_BYTES = 8 << 20
FETCH_WORKERS = 3  # containerd's default max_concurrent_downloads
ADDRESS_ENV = "CONTAINERD_ADDRESS"  # what ctr reads for --address
NAMESPACE_ENV = "CONTAINERD_NAMESPACE"  # what ctr and nerdctl read for --namespace
PREPARE_TRIES = 3


@dataclass
class Blob:
    """A manifest, index or config to store, with the GC labels naming its children."""

    kind: str  # "index", "manifest", "config"
    media_type: str
    digest: str
    data: bytes
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Layer:
    digest: str
    media_type: str
    size: int
    diff_id: str
    chain_id: str
    annotations: dict[str, str]


@dataclass
class ResolvedImage:
    """What a reference resolves to for one platform."""

    name: str  # the image record's name: the normalized reference
    target: Blob  # what the name points at: the top-level index or the manifest
    metadata: list[Blob]  # index(es), manifest, config: in the order they are stored
    manifest: Blob
    config: Blob
    platform: str
    layers: list[Layer]


@dataclass
class LayerResult:
    digest: str
    chain_id: str
    state: str  # "present" (unpacked before), "remote" (the snapshotter had it), "applied" (fetched and unpacked)
    seconds: float
    fetched_bytes: int = 0


@dataclass
class PullResult:
    image: str
    target: str
    manifest: str
    config: str
    platform: str
    snapshotter: str
    namespace: str
    chain_id: str
    layers: list[LayerResult]
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def pull(
    image: str,
    address: str,
    *,
    snapshotter: str = "liftoff",
    namespace: str = "default",
    plain_http: bool = False,
    docker_config: str | None = None,
    platform: str | None = None,
    on_layer: Callable[[int, int, LayerResult], None] | None = None,
) -> PullResult:
    """Pull `image` into containerd at `address`; `on_layer(i, n, result)` is called as each layer is done."""
    started = time.monotonic()
    wanted = platform or str(host_platform())
    with ContainerdClient(address, namespace) as client:
        _check_snapshotter(client, snapshotter)
        source = RegistrySource(image, plain_http=plain_http, docker_config=docker_config)
        try:
            resolved = resolve(source, wanted, lambda digest, limit: _cached(client, digest, limit))
            with client.lease():
                puller = _Puller(client, source, resolved, snapshotter)
                puller.store_metadata()
                layers = puller.unpack(on_layer)
                top = resolved.layers[-1].chain_id if resolved.layers else ""
                if top:
                    client.update_content_labels(resolved.config.digest, {GC_SNAPSHOT + snapshotter: top})
                target = resolved.target
                client.put_image(resolved.name, descriptor(target.media_type, target.digest, len(target.data)))
        finally:
            source.close()
    return PullResult(
        resolved.name,
        resolved.target.digest,
        resolved.manifest.digest,
        resolved.config.digest,
        resolved.platform,
        snapshotter,
        namespace,
        top,
        layers,
        time.monotonic() - started,
    )


def _check_snapshotter(client: ContainerdClient, snapshotter: str) -> None:
    try:
        client.stat_snapshot(snapshotter, "liftoff-pull-probe")
    except ContainerdError as e:
        raise snapshot_error(client, snapshotter, e) from None


def snapshot_error(client: ContainerdClient, snapshotter: str, e: ContainerdError) -> LiftoffError:
    """A snapshot call's failure, explained (unknown snapshotter, snapshotter down) when that is the cause."""
    if e.code is Code.INVALID_ARGUMENT and "not loaded" in e.details:
        return LiftoffError(
            f"containerd at {client.address} has no snapshotter {snapshotter!r} ({e.details}): add it as "
            f"[proxy_plugins.{snapshotter}] (liftoff snapshotter config prints it) and restart containerd with the "
            "snapshotter already running"
        )
    if e.code is Code.UNAVAILABLE and "lost containerd" not in str(e):
        return LiftoffError(
            f"containerd cannot reach snapshotter {snapshotter!r}: {e.details}; start it (liftoff snapshotter) on the "
            "socket containerd's config names"
        )
    return e


# Resolving the reference


def _cached(client: ContainerdClient, digest: str, limit: int) -> bytes | None:
    data = client.read_content(digest, limit)
    return data if data is not None and sha256_digest(data) == digest else None


def resolve(source: RegistrySource, platform: str, cached: Callable[[str, int], bytes | None] | None = None) -> ResolvedImage:
    """Fetch the manifest (through any indexes, picking `platform`) and the config; check the layer list.

    `cached(digest, limit)` may supply blobs by digest (child manifests, the config) without asking the registry.
    """
    cached = cached or (lambda digest, limit: None)
    wanted = parse_platform(platform)
    name = str(source.ref)
    media_type, body, digest = source.resolve()
    top = Node(digest, body, parse_document(body, media_type, name))

    def fetch(child: Descriptor) -> tuple[str, bytes]:
        known = cached(child.digest, mediatypes.MAX_MANIFEST_BYTES)
        return ("", known) if known is not None else source.manifest(child.digest)

    path = select_manifests(top, fetch, [wanted], name, first=True)[0]
    metadata = [Blob("index", node.media_type, node.digest, node.body) for node in path[:-1]]
    for blob, node in zip(metadata, path, strict=False):
        assert isinstance(node.document, Index)
        blob.labels = child_gc_labels(node.document.manifests)
    leaf = path[-1]
    manifest_doc = leaf.document
    assert isinstance(manifest_doc, Manifest)
    what = f"{name}@{leaf.digest}"
    config_desc = manifest_doc.config
    config_data = cached(config_desc.digest, MAX_CONFIG_BYTES)
    if config_data is None:
        config_data = read_blob(source, config_desc.digest, MAX_CONFIG_BYTES, "config", size=config_desc.size)
    parsed = parse_config(config_data, what)
    layers = [
        Layer(
            x.descriptor.digest, x.descriptor.media_type, x.descriptor.size, x.diff_id, x.chain_id, dict(x.descriptor.annotations)
        )
        for x in image_layers(manifest_doc, parsed, what)
    ]
    manifest = Blob("manifest", leaf.media_type, leaf.digest, leaf.body, child_gc_labels([config_desc, *manifest_doc.layers]))
    config = Blob("config", config_desc.media_type or mediatypes.OCI_CONFIG, config_desc.digest, config_data)
    metadata += [manifest, config]
    chosen = str(wanted) if metadata[0].kind == "index" else platform_text(config_platform(parsed))
    return ResolvedImage(name, metadata[0], metadata, manifest, config, chosen, layers)


def child_gc_labels(children: Sequence[Descriptor]) -> dict[str, str]:
    """The GC labels containerd puts on a manifest or index: one per child, keyed by the child's kind."""
    labels: dict[str, str] = {}
    counts: dict[str, int] = {}
    for child in children:
        media_type = child.media_type
        if media_type in (mediatypes.OCI_CONFIG, mediatypes.DOCKER_CONFIG) or media_type.endswith("config.v1+json"):
            key = GC_CONTENT + "config"
        elif media_type in mediatypes.MANIFESTS or media_type in mediatypes.INDEXES:
            key = GC_CONTENT + "m."
        elif media_type in mediatypes.LAYER_COMPRESSION:
            key = GC_CONTENT + "l."
        else:
            key = GC_CONTENT
        n = counts[key] = counts.get(key, -1) + 1
        labels[f"{key}{n}" if n or key.endswith(".") else key] = child.digest
    return labels


def snapshot_labels(image: ResolvedImage, i: int) -> dict[str, str]:
    """The labels containerd's unpacker gives layer i's Prepare (as CRI pulls with snapshot annotations on)."""
    layer = image.layers[i]
    labels = {k: v for k, v in layer.annotations.items() if k.startswith(INHERITED_PREFIX)}
    labels[SNAPSHOT_REF] = layer.chain_id
    labels[CRI_IMAGE_REF] = image.name
    labels[CRI_MANIFEST_DIGEST] = image.manifest.digest
    labels[CRI_LAYER_DIGEST] = layer.digest
    listed = ""
    for upper in image.layers[i:]:
        item = f",{upper.digest}" if listed else upper.digest
        if len(CRI_IMAGE_LAYERS) + len(listed) + len(item) > MAX_LABEL:
            break
        listed += item
    labels[CRI_IMAGE_LAYERS] = listed
    return labels


# Storing and unpacking


class _Puller:
    """One pull's content and snapshot work, inside the client's lease."""

    def __init__(self, client: ContainerdClient, source: RegistrySource, image: ResolvedImage, snapshotter: str) -> None:
        self.client = client
        self.source = source
        self.image = image
        self.snapshotter = snapshotter
        self.stop = threading.Event()
        host_name = urlsplit(f"dummy://{source.ref.registry}").hostname or source.ref.registry
        self.source_key = DISTRIBUTION_SOURCE + host_name
        self.repository = source.ref.repository

    def store_metadata(self) -> None:
        """Index(es), manifest and config into the content store, with their GC and source labels."""
        for blob in self.image.metadata:
            data = blob.data
            self.store_blob(f"{blob.kind}-{blob.digest}", blob.digest, len(data), lambda data=data: [data], blob.labels)

    def store_blob(self, ref: str, digest: str, size: int, chunks: Callable, labels: dict[str, str]) -> bool:
        """Write a blob unless containerd has it; either way it ends up with `labels` and this repository as a source."""
        new = dict(labels)
        if len(self.source_key) + len(self.repository) <= MAX_LABEL:
            new[self.source_key] = self.repository
        if self.client.write_blob(ref, digest, size, chunks, new):
            return True
        info = self.client.content_info(digest)
        known = (info.labels.get(self.source_key, "") if info else "").split(",")
        merged = ",".join(sorted({r for r in [*known, self.repository] if r}))
        if len(self.source_key) + len(merged) <= MAX_LABEL:
            new[self.source_key] = merged
        else:
            new.pop(self.source_key, None)
        if new:
            self.client.update_content_labels(digest, new)
        return False

    def unpack(self, on_layer: Callable[[int, int, LayerResult], None] | None) -> list[LayerResult]:
        """Every layer bottom-up; blobs of layers to apply are fetched FETCH_WORKERS at a time, ahead of applying."""
        results: list[LayerResult] = []
        fetches: dict[int, Future] = {}
        pool = ThreadPoolExecutor(FETCH_WORKERS, thread_name_prefix="liftoff-fetch")
        try:
            for i in range(len(self.image.layers)):
                may_be_remote = not fetches  # once a layer is applied, every layer above is applied too
                result = self._unpack_layer(i, may_be_remote, fetches, pool)
                results.append(result)
                if on_layer:
                    on_layer(i, len(self.image.layers), result)
        finally:
            self.stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
        return results

    def _unpack_layer(self, i: int, may_be_remote: bool, fetches: dict[int, Future], pool: ThreadPoolExecutor) -> LayerResult:
        started = time.monotonic()
        layer = self.image.layers[i]
        parent = self.image.layers[i - 1].chain_id if i else ""
        if self._stat(layer.chain_id) is not None:
            return LayerResult(layer.digest, layer.chain_id, "present", time.monotonic() - started)
        labels = snapshot_labels(self.image, i)
        key, mounts = self._prepare(layer.chain_id, parent, labels if may_be_remote else {})
        if key is None:
            return LayerResult(layer.digest, layer.chain_id, "remote", time.monotonic() - started)
        if not fetches:
            for j in range(i, len(self.image.layers)):
                fetches[j] = pool.submit(self._fetch, j)
        try:
            fetched = fetches[i].result()
            diff = descriptor(layer.media_type, layer.digest, layer.size)
            applied = self.client.apply(diff, mounts)
            if applied != layer.diff_id:
                raise ImageError(
                    f"{self.image.name}: layer {i + 1} ({layer.digest}) unpacks to {applied}, "
                    f"not the config's diff_id {layer.diff_id}"
                )
            self.client.commit(self.snapshotter, layer.chain_id, key, labels)
        except ContainerdError as e:
            self._remove(key)
            if e.code is Code.ALREADY_EXISTS:  # another pull committed this chainID first
                return LayerResult(layer.digest, layer.chain_id, "present", time.monotonic() - started)
            raise snapshot_error(self.client, self.snapshotter, e) from None
        except BaseException:
            self._remove(key)
            raise
        self.client.update_content_labels(layer.digest, {UNCOMPRESSED: layer.diff_id})
        return LayerResult(layer.digest, layer.chain_id, "applied", time.monotonic() - started, fetched)

    def _stat(self, name: str):
        try:
            return self.client.stat_snapshot(self.snapshotter, name)
        except ContainerdError as e:
            raise snapshot_error(self.client, self.snapshotter, e) from None

    def _prepare(self, chain_id: str, parent: str, labels: dict[str, str]) -> tuple[str | None, list]:
        """(key, mounts) of a new extraction snapshot, or (None, []) when the chainID exists (remote, or raced)."""
        for _try in range(PREPARE_TRIES):
            key = f"extract-{unique_part()} {chain_id}"
            try:
                return key, self.client.prepare(self.snapshotter, key, parent, labels)
            except ContainerdError as e:
                if e.code is not Code.ALREADY_EXISTS:
                    raise snapshot_error(self.client, self.snapshotter, e) from None
                if self._stat(chain_id) is not None:
                    return None, []
        raise LiftoffError(
            f"snapshotter {self.snapshotter!r} answered ALREADY_EXISTS to {PREPARE_TRIES} Prepares of {chain_id} but "
            "containerd has no snapshot by that name; check the snapshotter's log"
        )

    def _remove(self, key: str) -> None:
        try:
            self.client.remove_snapshot(self.snapshotter, key)
        except ContainerdError:
            pass  # the lease's end lets GC remove it

    def _fetch(self, i: int) -> int:
        """Layer i's blob from the registry into the content store; returns the bytes fetched (0 if containerd had it)."""
        layer = self.image.layers[i]
        fetched = [0]

        def chunks() -> Iterator[bytes]:
            stream = self.source.open_blob(layer.digest)
            try:
                remaining = layer.size + 1  # one byte past the size: containerd then refuses an oversized blob
                while remaining > 0:
                    if self.stop.is_set():
                        raise LiftoffError("pull stopped")
                    data = stream.read(min(CHUNK, remaining))
                    if not data:
                        return
                    remaining -= len(data)
                    fetched[0] += len(data)
                    yield data
            except (OSError, urllib3.exceptions.HTTPError) as e:
                raise RegistryError(f"reading layer {layer.digest} from {self.source.ref.registry} failed: {e}") from None
            finally:
                stream.close()

        try:
            self.store_blob(f"layer-{layer.digest}", layer.digest, layer.size, chunks, {})
        except ContainerdError as e:
            if e.code is Code.FAILED_PRECONDITION and "unexpected" in e.details:
                raise ImageError(
                    f"layer {layer.digest} from {self.source.ref.registry}/{self.repository} does not match its "
                    f"descriptor: {e.details}"
                ) from None
            raise
        return fetched[0]


# The command line


def default_address() -> str:
    """containerd's socket as ctr finds it: $CONTAINERD_ADDRESS, else the standard path."""
    return os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS


def default_namespace() -> str:
    """The containerd namespace as ctr and nerdctl find it: $CONTAINERD_NAMESPACE, else "default"."""
    return os.environ.get(NAMESPACE_ENV) or "default"


def run_cli(args: argparse.Namespace) -> int:
    """`liftoff pull`: pull, printing a line per layer (or one JSON document with --json)."""

    def show(i: int, n: int, r: LayerResult) -> None:
        fetched = f"  {format_size(r.fetched_bytes)} fetched" if r.fetched_bytes else ""
        print(f"  layer {i + 1}/{n}  {r.digest[:19]}  {r.state:<7}  {r.seconds:6.2f} s{fetched}", flush=True)

    result = pull(
        args.image,
        args.address or default_address(),
        snapshotter=args.snapshotter,
        namespace=args.namespace or default_namespace(),
        plain_http=args.plain_http,
        docker_config=args.docker_config,
        platform=args.platform,
        on_layer=None if args.json else show,
    )
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    counts = {state: sum(1 for r in result.layers if r.state == state) for state in ("remote", "applied", "present")}
    fetched = sum(r.fetched_bytes for r in result.layers)
    print(
        f"pulled {result.image} ({result.platform}, {result.target[:19]}) into namespace {result.namespace} with "
        f"snapshotter {result.snapshotter}: {counts['remote']} remote, {counts['applied']} applied, "
        f"{counts['present']} already present; {format_size(fetched)} fetched in {result.seconds:.1f} s"
    )
    return 0
