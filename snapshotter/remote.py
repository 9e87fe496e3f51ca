"""Lazy remote layers: containerd's remote-snapshot handshake, and FUSE views as overlay lowers.

The handshake (DESIGN.md section 3): containerd's pull-time unpacker (CRI PullImage,
`liftoff pull`) sends, for each layer, a Prepare labelled `containerd.io/snapshot.ref`
with the layer's chainID. If the layer is converted in a store, we commit a snapshot
for it right away (named by its parent and chainID, with the request's exact parent and
the ref label, plus our own labels to find the layer again) and answer ALREADY_EXISTS;
containerd then finds that snapshot with List and Stat and never fetches the layer blob.
A Prepare without the label (plain `ctr image pull`, `ctr image import`) is an ordinary
snapshot, always: answering ALREADY_EXISTS there fails the pull.

Mounts: each run of remote layers in a chain is one merged, read-only FUSE view served
by the FUSE daemon (snapshotter/fused/), used as one overlay lowerdir.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from layerstore.catalog import load_record
from layerstore.digests import chain_ids, check_digest
from layerstore.errors import FormatError, ImageError, LiftoffError, ObjectNotFound, StoreError
from layerstore.index import decode_index
from layerstore.layout import chain_key, layer_index_key
from layerstore.private import private_dir
from layerstore.records import ChainRecord, ImageRecord
from layerstore.stores import Store, StoreChain
from snapshotter.errors import AlreadyExists, NotFound
from snapshotter.fuse_control import SNAPSHOTTER_NEEDS, FusedClient, FusedUnavailable, view_id
from snapshotter.fused.indexes import IndexDir
from snapshotter.layout import Layout
from snapshotter.metadata import Kind, Snapshot
from snapshotter.store import PrepareRequest, SnapshotStore

log = logging.getLogger(__name__)

REF_LABEL = "containerd.io/snapshot.ref"
LAYER_DIGEST_LABEL = "containerd.io/snapshot/cri.layer-digest"
MANIFEST_LABEL = "containerd.io/snapshot/cri.manifest-digest"
REMOTE_LAYER_LABEL = "liftoff.remote.layer"  # the OCI layer digest a remote snapshot serves
REMOTE_CHAIN_LABEL = "liftoff.remote.chain"
REMOTE_NAME = "liftoff-remote"


def is_remote(snapshot: Snapshot) -> bool:
    return snapshot.kind == Kind.COMMITTED and REMOTE_LAYER_LABEL in snapshot.labels


def _chain_of(snapshot: Snapshot) -> str | None:
    """The chainID a committed snapshot stands for, when known."""
    if REMOTE_CHAIN_LABEL in snapshot.labels:
        return snapshot.labels[REMOTE_CHAIN_LABEL]
    last = snapshot.key.rsplit("/", 1)[-1]  # containerd names committed layers <ns>/<seq>/<chainID>
    return last if last.startswith("sha256:") and len(last) == 71 else None


class RemoteLayers:
    """Finds converted layers in the stores and keeps what the FUSE daemon needs on local disk."""

    def __init__(self, state: str | os.PathLike[str], stores: Sequence[Store], fused: FusedClient) -> None:
        self.state = Path(state)
        self.stores = StoreChain(list(stores))
        self.indexes = IndexDir(self.state / "indexes", self.stores.stores)
        self.fused = fused

    # -- finding layers -------------------------------------------------------------------

    def chain_record(self, chain_id: str) -> ChainRecord | None:
        """The store's record of `chain_id`, or None."""
        try:
            return ChainRecord.from_json(self.stores.get(chain_key(chain_id)), chain_key(chain_id))
        except ObjectNotFound:
            return None
        except (StoreError, FormatError) as e:
            log.warning("chain %s: cannot read its record (%s)", chain_id, e)
            return None

    def layer_for(self, chain_id: str, labels: dict[str, str]) -> str | None:
        """The converted layer digest for `chain_id`: from CRI's layer-digest label, else the chain record."""
        digest = labels.get(LAYER_DIGEST_LABEL)
        if digest:
            return digest
        record = self.chain_record(chain_id)
        return record.layer_digest if record else None

    def fetch_index(self, digest: str):
        """The layer's parsed index (copied to local disk first); None if the layer is not converted."""
        key = layer_index_key(digest)
        try:
            if self.indexes.has(digest):
                # metadata only here: the FUSE daemon checks every extent when it builds a view; a corrupt
                # local copy is fetched again from the stores
                return self.indexes.load(digest, check_extents=False)
            data = self.stores.get(key)
            index = decode_index(data, key, check_extents=False)
        except ObjectNotFound:
            return None
        except (StoreError, FormatError) as e:
            log.warning("layer %s: %s: pulling it as an ordinary layer", digest, e)
            return None
        self.indexes.put(digest, data)
        return index

    # -- the handshake --------------------------------------------------------------------

    def prepare_hook(self, store: SnapshotStore, request: PrepareRequest):
        """Answer a labelled Prepare of a converted layer with a committed remote snapshot."""
        chain_id = request.labels.get(REF_LABEL)
        if not chain_id or request.kind != Kind.ACTIVE:
            return None
        try:
            check_digest(chain_id, "chainID")
        except ImageError:
            return None
        digest = self.layer_for(chain_id, request.labels)
        if digest is None:
            return None
        index = self.fetch_index(digest)
        if index is None:
            log.info("layer %s (chain %s) is not converted: ordinary pull", digest, chain_id)
            return None
        parent = store.meta.get(request.namespace, request.parent) if request.parent else None
        if request.parent and parent is None:
            raise NotFound(f"parent snapshot {request.parent!r} does not exist")
        expected = self._expected_chain(parent, index.diff_id)
        if expected is not None and expected != chain_id:
            log.warning("layer %s does not complete chain %s on parent %r: ordinary pull", digest, chain_id, request.parent)
            return None
        name = self._name(request, chain_id)
        labels = {k: v for k, v in request.labels.items() if k == REF_LABEL or k.startswith("containerd.io/snapshot/")}
        labels.update({REMOTE_LAYER_LABEL: digest, REMOTE_CHAIN_LABEL: chain_id})
        size = index.tar_size
        self._commit_remote(store, request.namespace, name, parent, labels, size, len(index.entries))
        log.info("remote layer %s (chain %s) committed as %r", digest, chain_id, name)
        manifest = request.labels.get(MANIFEST_LABEL)
        if parent is None and manifest:  # the first layer of a pull that names its image: start on its profile now
            threading.Thread(target=self._prefetch_profile, args=(manifest,), daemon=True).start()
        self._mount_early(store, parent, digest, chain_id, manifest)
        raise AlreadyExists(f"remote snapshot {name!r} for chain {chain_id} already exists")

    def _mount_early(
        self, store: SnapshotStore, parent: Snapshot | None, digest: str, chain_id: str, manifest: str | None
    ) -> None:
        """If this layer tops a converted image whose layers are all remote, mount its view now and
        prefetch its startup profile, so both are under way before the container starts."""
        chain = store.meta.chain(parent.id) if parent is not None else []
        if not all(is_remote(s) for s in chain):
            return
        layers = [s.labels[REMOTE_LAYER_LABEL] for s in reversed(chain)] + [digest]
        threading.Thread(target=self._prefetch_image, args=(layers, chain_id, manifest), daemon=True).start()

    def _prefetch_profile(self, manifest: str) -> None:
        """Start fetching the image's startup profile into the cache while the pull goes on, and
        copy the indexes of its other layers, so their handshakes need no store round trip."""
        try:
            record = load_record(self.stores, manifest)
            if isinstance(record, ImageRecord):
                missing = [layer.digest for layer in record.layers if not self.indexes.has(layer.digest)]
                with ThreadPoolExecutor(max(1, min(8, len(missing)))) as pool:
                    list(pool.map(self.fetch_index, missing))
            profile = (record.profile or {}).get("chunks") if isinstance(record, ImageRecord) else None
            if profile:
                self.fused.prefetch(manifest, profile)
                log.info("prefetching the %d-chunk startup profile of %s", len(profile), manifest)
        except (LiftoffError, ObjectNotFound) as e:
            log.info("no early prefetch for %s: %s", manifest, e)

    def _prefetch_image(self, layers: list[str], chain_id: str, manifest: str | None) -> None:
        try:
            record = None
            candidates = [manifest] if manifest else []
            if not candidates:
                chain = self.chain_record(chain_id)
                candidates = chain.images if chain else []
            for digest in candidates:
                try:
                    found = load_record(self.stores, digest)
                except (ObjectNotFound, StoreError, FormatError):
                    continue
                if isinstance(found, ImageRecord) and [layer.digest for layer in found.layers] == layers:
                    record = found
                    break
            if record is None:
                return  # not the top of a converted image: the view is mounted when a container needs it
            profile = (record.profile or {}).get("chunks")
            if profile:  # at once, whoever mounts the view first: a container's mount carries no profile
                self.fused.prefetch(record.manifest_digest, profile)
            files = (record.profile or {}).get("files") if profile else None
            self.fused.mount(view_id(layers, False), layers, False, profile=profile, image=record.manifest_digest, files=files)
            log.info(
                "mounted the view of %s early%s",
                record.manifest_digest,
                f", prefetching {len(profile)} profile chunks" if profile else " (no startup profile)",
            )
        except LiftoffError as e:
            log.warning("early mount of chain %s failed (it is mounted on demand): %s", chain_id, e)

    @staticmethod
    def _expected_chain(parent: Snapshot | None, diff_id: str) -> str | None:
        if parent is None:
            return diff_id
        parent_chain = _chain_of(parent)
        return chain_ids([parent_chain, diff_id])[1] if parent_chain else None

    @staticmethod
    def _name(request: PrepareRequest, chain_id: str) -> str:
        """`<ns>/<seq>/liftoff-remote <chainID> <parent hash>`: one chainID may sit on different parents."""
        prefix = ""
        parts = request.key.split("/", 2)
        if len(parts) == 3 and parts[1].isdigit():
            prefix = f"{parts[0]}/{parts[1]}/"
        parent_hash = hashlib.sha256(request.parent.encode()).hexdigest()[:16]
        return f"{prefix}{REMOTE_NAME} {chain_id} {parent_hash}"

    @staticmethod
    def _commit_remote(store, namespace, name, parent, labels, size, inodes) -> None:
        with store.meta.write() as tx:
            if tx.get(namespace, name) is not None:
                return  # committed by an earlier pull: containerd will find it
            if parent is not None and tx.get(parent.namespace, parent.key) is None:
                raise NotFound(f"parent snapshot {parent.key!r} was removed")
            temp = store.layout.make_new(Kind.COMMITTED, None)
            sid = tx.insert(namespace, name, Kind.COMMITTED, parent.id if parent else None, labels, size, inodes)
            os.rename(temp, store.layout.snapshot_dir(sid))

    # -- after removals -------------------------------------------------------------------

    def removed_hook(self, store: SnapshotStore, removed: list[Snapshot]) -> None:
        """A remote layer was removed: unmount views no one uses and release its cached chunks."""
        if not any(is_remote(s) for s in removed):
            return
        live = [s for s in store.meta.list(None) if is_remote(s)]
        live_layers = sorted({s.labels[REMOTE_LAYER_LABEL] for s in live})
        try:
            for vid, spec in self.fused.views().items():
                if not set(spec.layers) <= set(live_layers):
                    self.fused.unmount(vid)
            self.fused.retain(live_layers)
        except LiftoffError as e:
            log.warning("could not release the space of removed remote layers: %s", e)


class RemoteLayout(Layout):
    """Lower directories where runs of remote layers are FUSE views (mounted on demand)."""

    def __init__(self, root: str | os.PathLike[str], remote: RemoteLayers) -> None:
        super().__init__(root)
        self.remote = remote

    def lower_dirs(self, parents: Sequence[Snapshot]) -> list[Path]:
        out: list[Path] = []
        run: list[Snapshot] = []  # remote snapshots, nearest first
        for i, parent in enumerate(parents):
            if is_remote(parent):
                run.append(parent)
                continue
            if run:
                out.append(self._view(run, layers_below=True))
                run = []
            out.append(self.lower_dir(parent))
            del i
        if run:
            out.append(self._view(run, layers_below=False))
        return out

    def _view(self, run: list[Snapshot], layers_below: bool) -> Path:
        layers = [s.labels[REMOTE_LAYER_LABEL] for s in reversed(run)]  # bottom first
        vid = view_id(layers, layers_below)
        return self.remote.fused.mount(vid, layers, layers_below)


def ensure_fused(root: Path, store_args: list[str], cache_size: str, log_level: str, timeout: float = 30.0) -> FusedClient:
    """Connect to the FUSE daemon under `root`, starting it (in its own session) if it is not running.

    Under systemd the daemon has its own unit; this start is for hosts without one. A running daemon
    that lacks what this snapshotter needs is not replaced: FusedIncompatible names both versions.
    """
    client = FusedClient(root / "fused.sock", needs=SNAPSHOTTER_NEEDS)
    try:
        client.check(SNAPSHOTTER_NEEDS)
        return client
    except FusedUnavailable:
        if client.listening() is None:
            raise  # something holds the socket but does not answer: a second daemon would not help
    private_dir(root)  # and its missing parents, the snapshotter's root among them: image bytes live here
    argv = [
        sys.executable,
        "-m",
        "liftoff",
        "--log-level",
        log_level,
        "fused",
        "--root",
        str(root),
        "--cache-size",
        cache_size,
        *store_args,
    ]
    with os.fdopen(os.open(root / "fused.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600), "ab") as log_file:
        subprocess.Popen(argv, stdout=log_file, stderr=log_file, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.alive():
            client.check(SNAPSHOTTER_NEEDS)
            log.info("started the FUSE daemon for %s", root)
            return client
        time.sleep(0.05)
    raise LiftoffError(f"the FUSE daemon did not start within {timeout:.0f} s; see {root / 'fused.log'}")
