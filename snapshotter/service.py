"""The gRPC servicer of containerd's Snapshots API: requests in, store calls, status codes out.

Namespaces: the `containerd-namespace` metadata when a request carries it (CRI calls do),
else the `<namespace>/<seq>/` prefix of the key that containerd puts on every backend key.
List without the header lists every namespace (containerd's garbage collector relies on it).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from layerstore.pb.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from layerstore.pb.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from layerstore.pb.containerd.types import mount_pb2
from snapshotter.errors import InvalidArgument, SnapshotterError
from snapshotter.filters import parse_all
from snapshotter.keys import NAMESPACE_HEADER, namespace_for
from snapshotter.metadata import Kind, Snapshot
from snapshotter.metrics import Metrics
from snapshotter.mounts import Mount
from snapshotter.store import PrepareRequest, SnapshotStore

log = logging.getLogger(__name__)

LIST_BATCH = 100  # snapshots per List message
LIST_BATCH_BYTES = 4 << 20  # and well under containerd's 16 MiB message limit


def _header(context: grpc.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == NAMESPACE_HEADER:
            return value
    return None


def _subject(request) -> str:
    if isinstance(request, pb.UpdateSnapshotRequest):
        return request.info.name
    if isinstance(request, pb.ListSnapshotsRequest):
        return ";".join(request.filters)
    return getattr(request, "key", "")


def _answer(method: Callable, code: grpc.StatusCode, error: Exception, context: grpc.ServicerContext) -> None:
    if isinstance(error, SnapshotterError):
        log.debug("%s refused: %s", method.__name__, error)
        context.abort(code, str(error))
    log.exception("%s failed", method.__name__, exc_info=error)
    context.abort(code, f"liftoff snapshotter: {method.__name__} failed: {error}")


def _unary(method: Callable) -> Callable:
    @functools.wraps(method)
    def handler(self: SnapshotService, request, context: grpc.ServicerContext):
        start, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            return method(self, request, context)
        except Exception as e:
            code = e.code if isinstance(e, SnapshotterError) else grpc.StatusCode.INTERNAL
            _answer(method, code, e, context)
        finally:
            elapsed = time.perf_counter() - start
            self.metrics.observe(method.__name__, code, elapsed)
            log.debug("%s %r -> %s in %.1f ms", method.__name__, _subject(request), code.name, elapsed * 1000)

    return handler


def _streaming(method: Callable) -> Callable:
    @functools.wraps(method)
    def handler(self: SnapshotService, request, context: grpc.ServicerContext):
        start, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            yield from method(self, request, context)
        except Exception as e:
            code = e.code if isinstance(e, SnapshotterError) else grpc.StatusCode.INTERNAL
            _answer(method, code, e, context)
        finally:
            elapsed = time.perf_counter() - start
            self.metrics.observe(method.__name__, code, elapsed)
            log.debug("%s %r -> %s in %.1f ms", method.__name__, _subject(request), code.name, elapsed * 1000)

    return handler


def mount_pb(mount: Mount) -> mount_pb2.Mount:
    """A Mount as containerd's message."""
    return mount_pb2.Mount(type=mount.type, source=mount.source, options=list(mount.options))


def info_pb(snapshot: Snapshot) -> pb.Info:
    """A snapshot's Info message (kind always set: containerd reads UNKNOWN as committed)."""
    created, updated = timestamp_pb2.Timestamp(), timestamp_pb2.Timestamp()
    created.FromNanoseconds(snapshot.created_ns)
    updated.FromNanoseconds(snapshot.updated_ns)
    return pb.Info(
        name=snapshot.key,
        parent=snapshot.parent,
        kind=int(snapshot.kind),
        created_at=created,
        updated_at=updated,
        labels=snapshot.labels,
    )


class SnapshotService(pb_grpc.SnapshotsServicer):
    """containerd.services.snapshots.v1.Snapshots over a SnapshotStore."""

    def __init__(self, store: SnapshotStore, metrics: Metrics | None = None) -> None:
        self.store = store
        self.metrics = metrics or Metrics()

    def _namespace(self, key: str, context: grpc.ServicerContext) -> str:
        return namespace_for(key, _header(context))

    def _prepare(self, request, context: grpc.ServicerContext, kind: Kind) -> list[mount_pb2.Mount]:
        prepare = PrepareRequest(
            namespace=self._namespace(request.key, context),
            key=request.key,
            parent=request.parent,
            kind=kind,
            labels=dict(request.labels),
        )
        return [mount_pb(m) for m in self.store.prepare(prepare)]

    @_unary
    def Prepare(self, request: pb.PrepareSnapshotRequest, context) -> pb.PrepareSnapshotResponse:
        return pb.PrepareSnapshotResponse(mounts=self._prepare(request, context, Kind.ACTIVE))

    @_unary
    def View(self, request: pb.ViewSnapshotRequest, context) -> pb.ViewSnapshotResponse:
        return pb.ViewSnapshotResponse(mounts=self._prepare(request, context, Kind.VIEW))

    @_unary
    def Mounts(self, request: pb.MountsRequest, context) -> pb.MountsResponse:
        mounts = self.store.mounts(self._namespace(request.key, context), request.key)
        return pb.MountsResponse(mounts=[mount_pb(m) for m in mounts])

    @_unary
    def Commit(self, request: pb.CommitSnapshotRequest, context) -> empty_pb2.Empty:
        self.store.commit(self._namespace(request.key, context), request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    @_unary
    def Remove(self, request: pb.RemoveSnapshotRequest, context) -> empty_pb2.Empty:
        self.store.remove(self._namespace(request.key, context), request.key)
        return empty_pb2.Empty()

    @_unary
    def Stat(self, request: pb.StatSnapshotRequest, context) -> pb.StatSnapshotResponse:
        snapshot = self.store.get(self._namespace(request.key, context), request.key)
        return pb.StatSnapshotResponse(info=info_pb(snapshot))

    @_unary
    def Update(self, request: pb.UpdateSnapshotRequest, context) -> pb.UpdateSnapshotResponse:
        if not request.HasField("info"):
            raise InvalidArgument("Update needs info with the snapshot's name")
        name = request.info.name
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        snapshot = self.store.update(self._namespace(name, context), name, dict(request.info.labels), paths)
        return pb.UpdateSnapshotResponse(info=info_pb(snapshot))

    @_streaming
    def List(self, request: pb.ListSnapshotsRequest, context) -> Iterator[pb.ListSnapshotsResponse]:
        selected = parse_all(request.filters)
        header = _header(context)
        namespace = namespace_for("", header) if header else None
        batch: list[pb.Info] = []
        size = 0
        for snapshot in self.store.list(namespace, selected):
            info = info_pb(snapshot)
            n = info.ByteSize()
            if batch and (len(batch) >= LIST_BATCH or size + n > LIST_BATCH_BYTES):
                yield pb.ListSnapshotsResponse(info=batch)
                batch, size = [], 0
            batch.append(info)
            size += n
        if batch:
            yield pb.ListSnapshotsResponse(info=batch)

    @_unary
    def Usage(self, request: pb.UsageRequest, context) -> pb.UsageResponse:
        size, inodes = self.store.usage(self._namespace(request.key, context), request.key)
        return pb.UsageResponse(size=size, inodes=inodes)

    @_unary
    def Cleanup(self, request: pb.CleanupRequest, context) -> empty_pb2.Empty:
        self.store.cleanup()
        return empty_pb2.Empty()
