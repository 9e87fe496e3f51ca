"""The contract between the snapshotter (and `liftoff profile`) and the FUSE daemon: the gRPC
service liftoff.fused.v1.Fused (proto/liftoff/fused/v1/fused.proto) on the daemon's unix socket.

This module is the client, the contract's version and capabilities, and the conversions between
its messages and what the two sides use (profile and trace documents, profile.py). The two
processes restart independently, so a client meets daemons of other versions: before relying on
the daemon it asks GetVersion (again after every reconnection) and refuses, in one line naming
both versions, a daemon that lacks a capability it needs.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from layerstore import __version__
from layerstore.errors import LiftoffError
from layerstore.pb.liftoff.fused.v1 import fused_pb2 as pb
from layerstore.pb.liftoff.fused.v1 import fused_pb2_grpc as pb_grpc

API_VERSION = "liftoff.fused.v1"
# What this build's daemon serves (one per RPC group; additions to v1 add new names, e.g. "handover").
CAPABILITIES = ("mount", "prefetch", "record", "unmount", "views", "retain", "status", "shutdown", "handover")
SNAPSHOTTER_NEEDS = ("mount", "prefetch", "unmount", "views", "retain")
PROFILE_NEEDS = ("mount", "record")
MAX_MESSAGE = 64 << 20
PROBE_TIMEOUT = 5.0  # GetVersion: the daemon answers it from memory
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.enable_http_proxy", 0),
    # a local socket: reconnect to a restarted daemon quickly
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

T = TypeVar("T", bound=Message)


class FusedUnavailable(LiftoffError):
    """The FUSE daemon is not running or did not answer."""


class FusedIncompatible(LiftoffError):
    """The FUSE daemon runs a version that lacks what this client needs."""


def view_id(layers: list[str], layers_below: bool) -> str:
    """A stable name for the merged view of these layers (bottom first)."""
    text = "\n".join(layers) + ("\nbelow" if layers_below else "")
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def view_spec(layers: list[str], layers_below: bool) -> pb.ViewSpec:
    return pb.ViewSpec(view_id=view_id(layers, layers_below), layers=layers, layers_below=layers_below)


# -- conversions between the contract's messages and profile.py's documents ----------------------


def profile_chunks_to_pb(chunks: Iterable[dict]) -> list[pb.ProfileChunk]:
    """Profile or trace chunks ({"layer", "sha256" hex, "size", "stored"}) as messages; LiftoffError if malformed."""
    out = []
    for chunk in chunks:
        try:
            sha256 = bytes.fromhex(chunk["sha256"])
            if len(sha256) != 32:
                raise ValueError("not 32 bytes")
            out.append(
                pb.ProfileChunk(
                    layer=chunk.get("layer", ""), sha256=sha256, size=chunk["size"], stored_size=chunk.get("stored", 0)
                )
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LiftoffError(f"malformed profile chunk {chunk!r} ({e}): record the profile again") from None
    return out


def profile_chunks_from_pb(chunks: Iterable[pb.ProfileChunk]) -> list[dict]:
    return [{"layer": c.layer, "sha256": c.sha256.hex(), "size": c.size, "stored": c.stored_size} for c in chunks]


def trace_to_pb(trace: dict) -> pb.Trace:
    """A trace (profile.py Recorder.trace) as a message."""
    return pb.Trace(
        version=trace["version"],
        recorded_at=trace["recorded_at"],
        seconds=trace["seconds"],
        chunks=profile_chunks_to_pb(trace["chunks"]),
        files=trace["files"],
        ranges=[
            pb.FileRanges(
                layer=item["layer"],
                path=bytes.fromhex(item["path"]),
                ranges=[pb.ByteRange(start=start, end=end) for start, end in item["ranges"]],
            )
            for item in trace["ranges"]
        ],
        layers=trace["layers"],
    )


def trace_from_pb(trace: pb.Trace) -> dict:
    """The trace document (profile.py) a message carries."""
    return {
        "version": trace.version,
        "recorded_at": trace.recorded_at,
        "seconds": trace.seconds,
        "chunks": profile_chunks_from_pb(trace.chunks),
        "files": list(trace.files),
        "ranges": [
            {"layer": item.layer, "path": item.path.hex(), "ranges": [[r.start, r.end] for r in item.ranges]}
            for item in trace.ranges
        ],
        "layers": list(trace.layers),
    }


def describe(version: pb.GetVersionResponse) -> str:
    """e.g. "liftoff 0.1.0 (liftoff.fused.v1; mount, prefetch, ...)"."""
    apis = ", ".join(version.api_versions) or "no API"
    return f"liftoff {version.build_version or '?'} ({apis}; {', '.join(version.capabilities)})"


# -- the client -----------------------------------------------------------------------------------


class FusedClient:
    """Calls the FUSE daemon at `socket_path`, checking first that it has the capabilities in `needs`.

    Every call has a deadline (`timeout`; GetVersion 5 s). FusedUnavailable: nothing answers at the
    socket; FusedIncompatible: the daemon lacks something this client needs; LiftoffError: the
    daemon refused or failed the request (its message)."""

    def __init__(self, socket_path: str | Path, timeout: float = 120.0, needs: Sequence[str] = ()) -> None:
        self.socket_path = str(Path(socket_path).absolute())
        self.timeout = timeout
        self.needs = tuple(needs)
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.FusedStub | None = None
        self._checked = False

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.unsubscribe(self._on_state)  # before close: its watcher thread must not outlive the channel
                self._channel.close()
            self._channel = self._stub = None
            self._checked = False

    def _connected(self) -> pb_grpc.FusedStub:
        with self._lock:
            if self._stub is None:
                self._channel = grpc.insecure_channel(f"unix:{self.socket_path}", options=CHANNEL_OPTIONS)
                self._channel.subscribe(self._on_state)
                self._stub = pb_grpc.FusedStub(self._channel)
            return self._stub

    def _on_state(self, state: grpc.ChannelConnectivity) -> None:
        """A connection that drops (a daemon restarting, perhaps another version) is checked again."""
        if state != grpc.ChannelConnectivity.READY:
            self._checked = False

    def listening(self) -> OSError | None:
        """None if something accepts connections at the socket, else why not."""
        with socket.socket(socket.AF_UNIX) as probe:
            probe.settimeout(PROBE_TIMEOUT)
            try:
                probe.connect(self.socket_path)
                return None
            except OSError as e:
                return e

    def _invoke(self, name: str, request: Message, timeout: float) -> Message:
        """One RPC, its failures as FusedUnavailable, FusedIncompatible or LiftoffError."""
        try:
            return getattr(self._connected(), name)(request, timeout=timeout)
        except grpc.RpcError as e:
            code = e.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                self.close()
                refused = self.listening()
                if refused is not None:
                    raise FusedUnavailable(
                        f"the liftoff FUSE daemon is not running at {self.socket_path}: {refused.strerror or refused}"
                    ) from None
                if name == "GetVersion":
                    raise FusedIncompatible(
                        f"something at {self.socket_path} accepts connections but does not speak {API_VERSION} (a liftoff "
                        f"fused older than the contract?); this liftoff {__version__} needs it: upgrade liftoff-fused to "
                        "this liftoff and restart it"
                    ) from None
                raise FusedUnavailable(
                    f"the liftoff FUSE daemon at {self.socket_path} broke off {name} ({e.details()}); it was restarted, "
                    "perhaps: try again"
                ) from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise FusedUnavailable(
                    f"the liftoff FUSE daemon at {self.socket_path} did not answer {name} within {timeout:.0f} s"
                ) from None
            if code == grpc.StatusCode.UNIMPLEMENTED:
                raise self._incompatible(f"does not implement {name}") from None
            raise LiftoffError(f"FUSE daemon: {name} failed: {e.details()}") from None

    def _incompatible(self, what: str) -> FusedIncompatible:
        try:
            version = self._invoke("GetVersion", pb.GetVersionRequest(), PROBE_TIMEOUT)
            daemon = describe(version)  # type: ignore[arg-type]
        except LiftoffError:
            daemon = f"a version that does not serve {API_VERSION}"
        return FusedIncompatible(
            f"liftoff fused at {self.socket_path} is {daemon} and {what}; this liftoff {__version__} needs {API_VERSION} "
            "with it: upgrade liftoff-fused to this liftoff and restart it"
        )

    def _check(self) -> None:
        """GetVersion, and the capabilities in `needs` (once per connection)."""
        if self._checked:
            return
        self.check(self.needs)
        self._checked = True

    def _call(self, name: str, request: Message, timeout: float | None = None) -> Message:
        self._check()
        return self._invoke(name, request, self.timeout if timeout is None else timeout)

    # -- the RPCs ---------------------------------------------------------------------------------

    def version(self) -> pb.GetVersionResponse:
        """The daemon's build version, contract versions and capabilities (raises FusedUnavailable)."""
        return self._invoke("GetVersion", pb.GetVersionRequest(), PROBE_TIMEOUT)  # type: ignore[return-value]

    def check(self, needs: Iterable[str]) -> pb.GetVersionResponse:
        """The daemon's version, after checking that it serves this contract with every capability in
        `needs`; FusedIncompatible (one line naming both versions) otherwise."""
        version = self.version()
        missing = [c for c in needs if c not in version.capabilities]
        if API_VERSION not in version.api_versions:
            missing.insert(0, API_VERSION)
        if missing:
            raise FusedIncompatible(
                f"liftoff fused at {self.socket_path} is {describe(version)}; this liftoff {__version__} needs "
                f"{', '.join(missing)}: upgrade liftoff-fused to this liftoff and restart it"
            )
        return version

    def alive(self) -> bool:
        """Whether a daemon answers GetVersion."""
        try:
            self.version()
            return True
        except LiftoffError:
            return False

    def mount(
        self,
        view: str,
        layers: list[str],
        layers_below: bool,
        profile: list[dict] | None = None,
        image: str | None = None,
        files: list[str] | None = None,
    ) -> Path:
        """Mount the view unless it is; returns its mount point. A fresh mount prefetches `profile`; the
        bytes of the profile's `files` are put in the view's page cache (once per view)."""
        request = pb.MountRequest(
            view=pb.ViewSpec(view_id=view, layers=layers, layers_below=layers_below),
            profile=profile_chunks_to_pb(profile or []),
            image=image or "",
            files=files or [],
        )
        return Path(_typed(pb.MountResponse, self._call("Mount", request)).mountpoint)

    def prefetch(self, image: str, profile: list[dict]) -> None:
        """Start fetching an image's startup profile (profile.py chunks) into the daemon's cache."""
        self._call("Prefetch", pb.PrefetchRequest(image=image, profile=profile_chunks_to_pb(profile)))

    def start_recording(self, view: str, layers: list[str], layers_below: bool) -> None:
        spec = pb.ViewSpec(view_id=view, layers=layers, layers_below=layers_below)
        self._call("StartRecording", pb.StartRecordingRequest(view=spec))

    def stop_recording(self, view: str) -> dict:
        """Stop recording the view; returns the trace (profile.py)."""
        reply = _typed(pb.StopRecordingResponse, self._call("StopRecording", pb.StopRecordingRequest(view_id=view)))
        return trace_from_pb(reply.trace)

    def unmount(self, view: str) -> None:
        self._call("Unmount", pb.UnmountRequest(view_id=view))

    def views(self) -> dict[str, pb.ViewSpec]:
        """The views the daemon serves, by id."""
        reply = _typed(pb.ListViewsResponse, self._call("ListViews", pb.ListViewsRequest()))
        return {v.view_id: v for v in reply.views}

    def retain(self, layers: list[str]) -> int:
        """Keep the cached chunks and indexes of `layers` only; returns how many chunks were dropped."""
        return _typed(pb.RetainResponse, self._call("Retain", pb.RetainRequest(layers=layers))).removed_chunks

    def status(self) -> pb.GetStatusResponse:
        return _typed(pb.GetStatusResponse, self._call("GetStatus", pb.GetStatusRequest()))

    def handover(self, fd_socket: str) -> str:
        """Ask the daemon to hand its views over to a new daemon that receives their descriptors at
        `fd_socket` (in the daemon's root); returns the old daemon's description. The old daemon exits."""
        version = self.check(["handover"])
        self._invoke("Handover", pb.HandoverRequest(fd_socket=fd_socket, new_version=__version__), self.timeout)
        return describe(version)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask the daemon to unmount everything and exit; wait until it stops answering."""
        if not self.alive():
            return
        self._invoke("Shutdown", pb.ShutdownRequest(), self.timeout)
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.close()


def _typed(kind: type[T], message: Message) -> T:
    assert isinstance(message, kind)
    return message
