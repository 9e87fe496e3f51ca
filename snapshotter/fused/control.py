"""The control service: liftoff.fused.v1.Fused (proto/liftoff/fused/v1/fused.proto) over gRPC on
the daemon's unix socket (0600, in the daemon's 0700 root). Requests are checked here, turned into
calls on the daemon, and failures into status codes: INVALID_ARGUMENT (a malformed request),
NOT_FOUND (stopping a recording that is not under way), FAILED_PRECONDITION (the daemon refused,
e.g. a layer without a local index), INTERNAL (a system call failed)."""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from layerstore import __version__
from layerstore.errors import LiftoffError
from layerstore.pb.liftoff.fused.v1 import fused_pb2 as pb
from layerstore.pb.liftoff.fused.v1 import fused_pb2_grpc as pb_grpc
from snapshotter import fuse_control
from snapshotter.fuse_server import opcode_name
from snapshotter.fused.daemon import FuseDaemon
from snapshotter.fused.recording import NotRecording
from snapshotter.fused.views import ViewSpec
from snapshotter.grpcsocket import start_unix_server
from snapshotter.prefetch import ProfileChunk

log = logging.getLogger(__name__)

SOCKET_MODE = 0o600
WORKERS = 16
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def build_version() -> str:
    """This build's version; LIFTOFF_FUSED_BUILD_VERSION overrides it (tests of an upgrade handover)."""
    return os.environ.get("LIFTOFF_FUSED_BUILD_VERSION") or __version__


class BadRequest(LiftoffError):
    """A request that breaks the contract."""


def _rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Map the daemon's errors onto status codes (and log them, as the daemon's log is where they are looked for)."""

    @functools.wraps(method)
    def wrapper(self: FusedService, request: Any, context: grpc.ServicerContext) -> Any:
        name = method.__name__
        try:
            return method(self, request)
        except BadRequest as e:
            log.warning("%s refused: %s", name, e)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except NotRecording as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except LiftoffError as e:
            log.warning("%s failed: %s", name, e)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except OSError as e:
            log.warning("%s failed: %s", name, e)
            context.abort(grpc.StatusCode.INTERNAL, str(e))

    return wrapper


def _spec(message: pb.ViewSpec) -> ViewSpec:
    layers = list(message.layers)
    if not layers:
        raise BadRequest("a view needs at least one layer")
    for digest in layers:
        if not _DIGEST.fullmatch(digest):
            raise BadRequest(f"layer {digest!r} is not a sha256 digest")
    if message.view_id != fuse_control.view_id(layers, message.layers_below):
        raise BadRequest(f"view id {message.view_id!r} does not match its layers")
    return ViewSpec(message.view_id, layers, message.layers_below)


def _profile(chunks) -> list[ProfileChunk]:
    out = []
    for chunk in chunks:
        if len(chunk.sha256) != 32:
            raise BadRequest(f"a profile chunk's sha256 has {len(chunk.sha256)} bytes, not 32")
        out.append(ProfileChunk(chunk.sha256, chunk.size, chunk.layer))
    return out


def _pb_spec(spec: ViewSpec) -> pb.ViewSpec:
    return pb.ViewSpec(view_id=spec.view_id, layers=spec.layers, layers_below=spec.layers_below)


class FusedService(pb_grpc.FusedServicer):
    """The liftoff.fused.v1.Fused service over one daemon."""

    def __init__(self, daemon: FuseDaemon) -> None:
        self.daemon = daemon

    def GetVersion(self, request: pb.GetVersionRequest, context: grpc.ServicerContext) -> pb.GetVersionResponse:
        return pb.GetVersionResponse(
            build_version=build_version(), api_versions=[fuse_control.API_VERSION], capabilities=fuse_control.CAPABILITIES
        )

    @_rpc
    def Handover(self, request: pb.HandoverRequest) -> pb.HandoverResponse:
        path = request.fd_socket
        if not path.startswith("/") or Path(path).parent != self.daemon.root:
            raise BadRequest(f"the handover socket {path!r} is not in {self.daemon.root}")
        log.info("handing the views over to a new daemon (%s)", request.new_version or "?")
        views, unanswered = self.daemon.hand_over(path)
        return pb.HandoverResponse(view_ids=views, unanswered=unanswered)

    @_rpc
    def Mount(self, request: pb.MountRequest) -> pb.MountResponse:
        spec = _spec(request.view)
        path = self.daemon.mount(spec, _profile(request.profile), request.image or None, list(request.files))
        return pb.MountResponse(mountpoint=str(path))

    @_rpc
    def Prefetch(self, request: pb.PrefetchRequest) -> pb.PrefetchResponse:
        self.daemon.prefetch(request.image, _profile(request.profile))
        return pb.PrefetchResponse()

    @_rpc
    def StartRecording(self, request: pb.StartRecordingRequest) -> pb.StartRecordingResponse:
        self.daemon.start_recording(_spec(request.view))
        return pb.StartRecordingResponse()

    @_rpc
    def StopRecording(self, request: pb.StopRecordingRequest) -> pb.StopRecordingResponse:
        return pb.StopRecordingResponse(trace=fuse_control.trace_to_pb(self.daemon.stop_recording(request.view_id)))

    @_rpc
    def Unmount(self, request: pb.UnmountRequest) -> pb.UnmountResponse:
        if not re.fullmatch(r"[0-9a-f]{24}", request.view_id):
            raise BadRequest(f"{request.view_id!r} is not a view id")
        self.daemon.views.unmount(request.view_id)
        return pb.UnmountResponse()

    @_rpc
    def ListViews(self, request: pb.ListViewsRequest) -> pb.ListViewsResponse:
        return pb.ListViewsResponse(views=[_pb_spec(v.spec) for v in self.daemon.views.all()])

    @_rpc
    def Retain(self, request: pb.RetainRequest) -> pb.RetainResponse:
        for digest in request.layers:
            if not _DIGEST.fullmatch(digest):
                raise BadRequest(f"layer {digest!r} is not a sha256 digest")
        return pb.RetainResponse(removed_chunks=self.daemon.retain(list(request.layers)))

    @_rpc
    def GetStatus(self, request: pb.GetStatusRequest) -> pb.GetStatusResponse:
        daemon = self.daemon
        stats = daemon.fetcher.stats
        prefetch = daemon.prefetcher.stats
        return pb.GetStatusResponse(
            views=[
                pb.ViewStatus(
                    view=_pb_spec(v.spec),
                    mountpoint=str(v.mountpoint),
                    requests={opcode_name(op): n for op, n in sorted(v.session.requests.items())},
                )
                for v in daemon.views.all()
            ],
            cache=pb.CacheStatus(
                bytes=daemon.cache.used,
                capacity=daemon.cache.capacity,
                chunks=len(daemon.cache.digests()),
                evictions=daemon.cache.evictions,
            ),
            fetch=pb.FetchStatus(
                chunks=stats.chunks,
                bytes=stats.bytes,
                cache_hits=stats.cache_hits,
                failures=stats.failures,
                retries=stats.retries,
            ),
            prefetch=pb.PrefetchStatus(
                profile_chunks=prefetch["profile_chunks"],
                profile_seconds=prefetch["profile_seconds"],
                fill_chunks=prefetch["fill_chunks"],
            ),
        )

    def Shutdown(self, request: pb.ShutdownRequest, context: grpc.ServicerContext) -> pb.ShutdownResponse:
        log.info("shutdown requested")
        self.daemon.shutdown_requested = True
        self.daemon.stopping.set()
        return pb.ShutdownResponse()


def serve_control(daemon: FuseDaemon, socket_path: Path) -> grpc.Server:
    """Start answering the Fused service on `socket_path` (mode 0600; a stale socket is replaced:
    fused.lock, held by the daemon, ensures no other daemon serves this root)."""
    socket_path.unlink(missing_ok=True)
    return start_unix_server(
        socket_path,
        SOCKET_MODE,
        lambda server: pb_grpc.add_FusedServicer_to_server(FusedService(daemon), server),
        workers=WORKERS,
        name="control",
        max_message=fuse_control.MAX_MESSAGE,
    )
