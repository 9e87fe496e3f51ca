"""A small client of containerd's own gRPC API on its unix socket: content, images, snapshots, diff, leases.

Every call carries the namespace header; inside `lease()` also the lease header, so whatever is
created is held by that lease until it is deleted. gRPC failures become `ContainerdError`s: one line
that names the call, with the status code kept for callers that branch on it (ALREADY_EXISTS, ...).
"""

from __future__ import annotations

import os
import queue
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import grpc

from layerstore.errors import LiftoffError
from layerstore.pb.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from layerstore.pb.containerd.services.diff.v1 import diff_pb2, diff_pb2_grpc
from layerstore.pb.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from layerstore.pb.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from layerstore.pb.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from layerstore.pb.containerd.types import descriptor_pb2, mount_pb2
from layerstore.retry import Backoff

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"
GC_EXPIRE_LABEL = "containerd.io/gc.expire"
CHUNK = 1 << 20  # bytes per Content.Write message (containerd caps messages at 16 MiB)
CALL_TIMEOUT = 60.0
LOCK_WAIT = 1800.0  # how long to wait for another client's write of the same blob
LOCK_BACKOFF = Backoff(base=0.05, cap=1.0)  # polls of a locked ingest: soon at first, then about every second

Code = grpc.StatusCode


class ContainerdError(LiftoffError):
    """A containerd call failed; `code` is the gRPC status (None when containerd was not reached)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, details: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.details = details


def probe_socket(address: str, what: str = "containerd", timeout: float = 5.0) -> None:
    """Connect once to the unix socket at `address`; ContainerdError naming the reason if that fails."""
    hint = f"is {what} running? (pass its socket with --address)"
    if not os.path.exists(address):
        raise ContainerdError(f"cannot reach {what} at {address}: no such socket; {hint}")
    with socket.socket(socket.AF_UNIX) as probe:
        probe.settimeout(timeout)
        try:
            probe.connect(address)
        except ConnectionRefusedError:
            raise ContainerdError(f"cannot reach {what} at {address}: connection refused (nothing listens); {hint}") from None
        except PermissionError:
            raise ContainerdError(f"cannot reach {what} at {address}: permission denied; run as root") from None
        except OSError as e:
            raise ContainerdError(f"cannot reach {what} at {address}: {e.strerror or e}; {hint}") from None


def descriptor(media_type: str, digest: str, size: int, annotations: dict[str, str] | None = None) -> descriptor_pb2.Descriptor:
    """A containerd.types.Descriptor."""
    return descriptor_pb2.Descriptor(media_type=media_type, digest=digest, size=size, annotations=annotations or {})


def unique_part() -> str:
    """What containerd puts in unpack keys to make them unique: nanoseconds and random bytes."""
    return f"{time.time_ns() % 1_000_000_000}-{secrets.token_urlsafe(9)}"


class ContainerdClient:
    """containerd's Content, Images, Snapshots, Diff and Leases services in one namespace."""

    def __init__(self, address: str = DEFAULT_ADDRESS, namespace: str = "default") -> None:
        probe_socket(address)
        self.address = address
        self.namespace = namespace
        self.lease_id: str | None = None
        self.channel = grpc.insecure_channel(f"unix:{address}")
        self.content = content_pb2_grpc.ContentStub(self.channel)
        self.images = images_pb2_grpc.ImagesStub(self.channel)
        self.snapshots = snapshots_pb2_grpc.SnapshotsStub(self.channel)
        self.diff = diff_pb2_grpc.DiffStub(self.channel)
        self.leases = leases_pb2_grpc.LeasesStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ContainerdClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _md(self) -> list[tuple[str, str]]:
        md = [(NAMESPACE_HEADER, self.namespace)]
        return [*md, (LEASE_HEADER, self.lease_id)] if self.lease_id else md

    def _error(self, what: str, e: grpc.RpcError) -> ContainerdError:
        code, details = e.code(), e.details() or ""
        if code is Code.UNAVAILABLE and any(s in details for s in ("failed to connect to all addresses", "Socket closed")):
            return ContainerdError(f"lost containerd at {self.address} during {what}: {details}", code, details)
        return ContainerdError(f"containerd {what} failed ({code.name}): {details}", code, details)

    def _call(self, what: str, method: Callable, request, timeout: float | None = CALL_TIMEOUT):
        try:
            return method(request, metadata=self._md(), timeout=timeout)
        except grpc.RpcError as e:
            raise self._error(what, e) from None

    # Leases

    @contextmanager
    def lease(self, expire: float = 3600.0) -> Iterator[str]:
        """Hold everything created inside the block with a new lease; deleted at the end (GC then decides).

        The lease expires after `expire` seconds on its own, so a killed client leaves nothing for long.
        """
        until = (datetime.now(UTC) + timedelta(seconds=expire)).strftime("%Y-%m-%dT%H:%M:%SZ")
        request = leases_pb2.CreateRequest(id=f"liftoff-{unique_part()}", labels={GC_EXPIRE_LABEL: until})
        lease = self._call("Leases.Create", self.leases.Create, request).lease
        self.lease_id = lease.id
        try:
            yield lease.id
        except BaseException:
            self.lease_id = None
            try:
                self._call("Leases.Delete", self.leases.Delete, leases_pb2.DeleteRequest(id=lease.id))
            except ContainerdError:
                pass  # containerd is gone or failing: keep the original error; the lease expires on its own
            raise
        self.lease_id = None
        self._call("Leases.Delete", self.leases.Delete, leases_pb2.DeleteRequest(id=lease.id))

    # Content

    def content_info(self, digest: str) -> content_pb2.Info | None:
        """The content store's record of a blob, or None."""
        try:
            return self._call(f"Content.Info {digest}", self.content.Info, content_pb2.InfoRequest(digest=digest)).info
        except ContainerdError as e:
            if e.code is Code.NOT_FOUND:
                return None
            raise

    def read_content(self, digest: str, limit: int) -> bytes | None:
        """A small blob's bytes from the content store, or None if it is not there; refuses blobs over `limit`."""
        info = self.content_info(digest)
        if info is None:
            return None
        if info.size > limit:
            raise ContainerdError(f"containerd's content {digest} is {info.size} bytes, over the {limit} byte limit")
        request = content_pb2.ReadContentRequest(digest=digest)
        try:
            return b"".join(m.data for m in self.content.Read(request, metadata=self._md(), timeout=CALL_TIMEOUT))
        except grpc.RpcError as e:
            if e.code() is Code.NOT_FOUND:  # collected since Info
                return None
            raise self._error(f"Content.Read {digest}", e) from None

    def update_content_labels(self, digest: str, labels: dict[str, str]) -> None:
        """Set these labels on a blob, leaving its other labels alone."""
        request = content_pb2.UpdateRequest(info=content_pb2.Info(digest=digest, labels=labels))
        request.update_mask.paths.extend(f"labels.{key}" for key in labels)
        self._call(f"Content.Update {digest}", self.content.Update, request)

    def write_blob(self, ref: str, digest: str, size: int, chunks: Callable[[], Iterable[bytes]], labels: dict[str, str]) -> bool:
        """Store a blob with `labels`: True if written, False if this namespace had it (`chunks` is then not called,
        nor when another namespace has it: containerd's content store is shared, only the records are per namespace).

        `ref` names the ingest: a second client writing the same ref waits here until the first is done.
        containerd checks size and digest on commit.
        """
        pauses = LOCK_BACKOFF.pauses(budget=LOCK_WAIT)
        while True:
            try:
                return self._write_once(ref, digest, size, chunks, labels)
            except ContainerdError as e:
                locked = e.code in (Code.UNAVAILABLE, Code.FAILED_PRECONDITION) and "locked" in e.details
                if not locked or next(pauses, None) is None:
                    raise

    def _write_once(self, ref: str, digest: str, size: int, chunks: Callable[[], Iterable[bytes]], labels: dict) -> bool:
        requests: queue.SimpleQueue = queue.SimpleQueue()

        def stream() -> Iterator[content_pb2.WriteContentRequest]:
            while (item := requests.get()) is not None:
                yield item

        call = self.content.Write(stream(), metadata=self._md())
        done = False
        try:
            requests.put(content_pb2.WriteContentRequest(action=content_pb2.STAT, ref=ref, total=size, expected=digest))
            status = next(call)
            offset = 0
            if size == 0 or status.offset != size:  # == size: another namespace has the blob; commit without data
                for data in chunks():
                    for start in range(0, len(data), CHUNK):
                        piece = data[start : start + CHUNK]
                        requests.put(content_pb2.WriteContentRequest(action=content_pb2.WRITE, offset=offset, data=piece))
                        offset = next(call).offset
            else:
                offset = size
            commit = content_pb2.WriteContentRequest(action=content_pb2.COMMIT, offset=offset, total=size, expected=digest)
            commit.labels.update(labels)
            requests.put(commit)
            next(call)
            done = True
            return True
        except grpc.RpcError as e:
            if e.code() is Code.ALREADY_EXISTS:
                done = True
                return False
            raise self._error(f"Content.Write of {digest}", e) from None
        finally:
            requests.put(None)
            if not done:
                call.cancel()
                self._abort(ref)

    def _abort(self, ref: str) -> None:
        try:
            self.content.Abort(content_pb2.AbortRequest(ref=ref), metadata=self._md(), timeout=CALL_TIMEOUT)
        except grpc.RpcError:
            pass  # nothing to abort, or containerd is gone: the lease's end lets GC drop the ingest

    # Snapshots

    def stat_snapshot(self, snapshotter: str, key: str) -> snapshots_pb2.Info | None:
        """A snapshot's Info, or None if this namespace has no snapshot by that name."""
        request = snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=key)
        try:
            return self._call(f"Snapshots.Stat {key}", self.snapshots.Stat, request).info
        except ContainerdError as e:
            if e.code is Code.NOT_FOUND:
                return None
            raise

    def prepare(self, snapshotter: str, key: str, parent: str, labels: dict[str, str]) -> list[mount_pb2.Mount]:
        """An active snapshot's mounts (ContainerdError with code ALREADY_EXISTS when a target already exists)."""
        request = snapshots_pb2.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent, labels=labels)
        return list(self._call(f"Snapshots.Prepare {key!r}", self.snapshots.Prepare, request, timeout=None).mounts)

    def commit(self, snapshotter: str, name: str, key: str, labels: dict[str, str]) -> None:
        request = snapshots_pb2.CommitSnapshotRequest(snapshotter=snapshotter, name=name, key=key, labels=labels)
        self._call(f"Snapshots.Commit {name}", self.snapshots.Commit, request, timeout=None)

    def remove_snapshot(self, snapshotter: str, key: str) -> None:
        request = snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key)
        self._call(f"Snapshots.Remove {key!r}", self.snapshots.Remove, request)

    # Diff

    def apply(self, diff: descriptor_pb2.Descriptor, mounts: list[mount_pb2.Mount]) -> str:
        """Unpack a layer blob from the content store onto `mounts`; returns its diffID."""
        request = diff_pb2.ApplyRequest(diff=diff, mounts=mounts)
        return self._call(f"Diff.Apply of {diff.digest}", self.diff.Apply, request, timeout=None).applied.digest

    # Images

    def get_image(self, name: str) -> images_pb2.Image | None:
        try:
            return self._call(f"Images.Get {name}", self.images.Get, images_pb2.GetImageRequest(name=name)).image
        except ContainerdError as e:
            if e.code is Code.NOT_FOUND:
                return None
            raise

    def put_image(self, name: str, target: descriptor_pb2.Descriptor) -> None:
        """Create the image record `name` -> `target`, or point an existing one at `target` (its labels stay)."""
        image = images_pb2.Image(name=name, target=target)
        try:
            self._call(f"Images.Create {name}", self.images.Create, images_pb2.CreateImageRequest(image=image))
        except ContainerdError as e:
            if e.code is not Code.ALREADY_EXISTS:
                raise
            request = images_pb2.UpdateImageRequest(image=image)
            request.update_mask.paths.append("target")
            self._call(f"Images.Update {name}", self.images.Update, request)

    def delete_image(self, name: str, sync: bool = False) -> None:
        request = images_pb2.DeleteImageRequest(name=name, sync=sync)
        self._call(f"Images.Delete {name}", self.images.Delete, request, timeout=None)
