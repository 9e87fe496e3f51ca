"""The liftoff.fused.v1 contract through a real `liftoff fused` (its own process, a file:// store
with one tiny converted layer): every RPC, the errors a client sees, the version check."""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import zstandard

from layerstore import __version__
from layerstore.errors import LiftoffError
from layerstore.index import encode_index
from layerstore.layout import chunk_key, layer_index_key
from layerstore.pb.liftoff.fused.v1 import fused_pb2 as pb
from layerstore.pb.liftoff.fused.v1 import fused_pb2_grpc as pb_grpc
from layerstore.pb.liftoff.index.v1 import index_pb2
from layerstore.stores.file import FileStore
from snapshotter.fuse_control import (
    API_VERSION,
    CAPABILITIES,
    SNAPSHOTTER_NEEDS,
    FusedClient,
    FusedIncompatible,
    FusedUnavailable,
    view_id,
)
from tests.conftest import ROOT

FILES = {b"app/a.txt": b"first file\n" * 300, b"app/b.txt": b"second file\n" * 200}
LAYER = "sha256:" + "c0" * 32


def _layer(store: FileStore) -> tuple[bytes, list[dict]]:
    """One layer of two files, a chunk each, in `store`; returns its encoded index and its chunks as a profile."""
    index = index_pb2.LayerIndex(format_major=1, layer_digest=LAYER, diff_id="sha256:" + "d0" * 32)
    index.entries.add(path=b"", type=index_pb2.ENTRY_TYPE_DIRECTORY, mode=0o755)
    index.entries.add(path=b"app", type=index_pb2.ENTRY_TYPE_DIRECTORY, mode=0o755)
    profile = []
    for number, (path, data) in enumerate(FILES.items()):
        sha256 = hashlib.sha256(data).digest()
        stored = zstandard.ZstdCompressor().compress(data)
        store.put(chunk_key(sha256), stored)
        index.chunks.add(sha256=sha256, size=len(data), stored_size=len(stored))
        entry = index.entries.add(path=path, type=index_pb2.ENTRY_TYPE_REGULAR, mode=0o644, size=len(data))
        entry.extents.add(chunk=number, offset=0, length=len(data))
        profile.append({"layer": LAYER, "sha256": sha256.hex(), "size": len(data), "stored": len(stored)})
    data = encode_index(index)
    store.put(layer_index_key(LAYER), data)
    return data, profile


class Daemon:
    """`liftoff fused` as a child, with NOTIFY_SOCKET set to a datagram socket of ours."""

    def __init__(self, workdir: Path, store_url: str, notify: str = "notify.sock") -> None:
        self.root = workdir / "remote"
        self.store_url = store_url
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(workdir / notify))
        self.notify.settimeout(30)
        self.log = open(workdir / "fused.log", "ab")  # noqa: SIM115 (the child's log, open while it runs)
        argv = [sys.executable, "-m", "liftoff", "--log-level", "info", "fused", "--root", str(self.root), "--store", store_url]
        env = {**os.environ, "NOTIFY_SOCKET": str(workdir / notify)}
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
        self.ready = self.notify.recv(4096)  # READY=1 once it answers
        self.client = FusedClient(self.root / "fused.sock", timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)
        self.client.close()
        self.notify.close()
        self.log.close()


@pytest.fixture
def daemon(tmp_path):
    store = FileStore(tmp_path / "store")
    index, profile = _layer(store)
    (tmp_path / "remote" / "indexes").mkdir(parents=True, mode=0o700)
    (tmp_path / "remote" / "indexes" / LAYER.split(":")[1]).write_bytes(index)  # as the snapshotter copies it at pull
    d = Daemon(tmp_path, f"file://{store.root}")
    d.profile = profile
    yield d
    d.stop()


def test_every_rpc_through_a_real_daemon(daemon):
    client, vid = daemon.client, view_id([LAYER], False)
    assert daemon.ready == b"READY=1"
    assert stat.S_IMODE(os.stat(daemon.root / "fused.sock").st_mode) == 0o600
    version = client.check(CAPABILITIES)
    assert (version.build_version, list(version.api_versions)) == (__version__, [API_VERSION])
    assert set(version.capabilities) == set(CAPABILITIES)

    mountpoint = client.mount(vid, [LAYER], False, profile=daemon.profile[:1], image="sha256:" + "e0" * 32)
    assert mountpoint == daemon.root / "mnt" / vid and os.path.ismount(mountpoint)
    assert client.mount(vid, [LAYER], False) == mountpoint  # mounted already: the same view
    assert client.views() == {vid: pb.ViewSpec(view_id=vid, layers=[LAYER], layers_below=False)}
    deadline = time.monotonic() + 20
    while client.status().prefetch.profile_chunks < 1 and time.monotonic() < deadline:
        time.sleep(0.05)  # the profile is prefetched in the background
    assert client.status().prefetch.profile_chunks == 1

    client.prefetch("sha256:" + "f0" * 32, daemon.profile[1:])  # before any view of that image
    deadline = time.monotonic() + 20
    while client.status().cache.chunks < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.status().cache.chunks == 2

    client.start_recording(vid, [LAYER], False)
    assert (mountpoint / "app" / "b.txt").read_bytes() == FILES[b"app/b.txt"]
    trace = client.stop_recording(vid)
    assert [c["sha256"] for c in trace["chunks"]] == [daemon.profile[1]["sha256"]]
    assert trace["chunks"][0] == daemon.profile[1] and trace["files"] == ["/app/b.txt"]
    assert trace["ranges"] == [{"layer": LAYER, "path": b"app/b.txt".hex(), "ranges": [[0, len(FILES[b"app/b.txt"])]]}]
    assert trace["layers"] == [LAYER] and trace["version"] == 1
    with pytest.raises(LiftoffError, match=f"StopRecording failed: view {vid} is not being recorded"):
        client.stop_recording(vid)

    status = client.status()
    (view,) = status.views
    assert view.view.view_id == vid and view.mountpoint == str(mountpoint)
    assert view.requests["lookup"] >= 2 and view.requests["init"] == 1
    assert status.fetch.chunks == 2 and status.cache.capacity > 0

    client.unmount(vid)
    assert client.views() == {} and not mountpoint.exists()
    assert not (daemon.root / "views" / f"{vid}.json").exists()
    assert client.retain([LAYER]) == 0  # the layer is still in use: everything stays
    assert client.retain([]) == 2
    assert client.status().cache.chunks == 0 and not (daemon.root / "indexes" / LAYER.split(":")[1]).exists()

    client.shutdown()
    assert daemon.process.wait(20) == 0
    assert daemon.notify.recv(4096) == b"STOPPING=1"
    with pytest.raises(FusedUnavailable, match=f"the liftoff FUSE daemon is not running at {daemon.root / 'fused.sock'}"):
        client.views()


def test_the_page_fill_comes_with_the_profile_and_leaves_for_a_recording(daemon):
    """A container's mount may come before the early mount that carries the profile's files: the view
    still gets its page fill then. A recording that starts on it drops the pages given (it must see
    every read of the start)."""
    client, vid = daemon.client, view_id([LAYER], False)
    mountpoint = client.mount(vid, [LAYER], False)  # the container's mount, without a profile
    image, files = "sha256:" + "e1" * 32, ["/app/a.txt", "/app/b.txt"]
    client.prefetch(image, daemon.profile)  # as the snapshotter's early mount does (remote.py)
    assert client.mount(vid, [LAYER], False, profile=daemon.profile, image=image, files=files) == mountpoint
    log = daemon.root.parent / "fused.log"
    deadline = time.monotonic() + 20
    while f"page fill of view {vid}: 2 files".encode() not in log.read_bytes():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    client.start_recording(vid, [LAYER], False)
    assert (mountpoint / "app" / "a.txt").read_bytes() == FILES[b"app/a.txt"]
    assert client.stop_recording(vid)["files"] == ["/app/a.txt"]  # read through the daemon, so recorded


def test_a_client_needing_a_capability_the_daemon_lacks_names_both_versions(daemon):
    socket_path = daemon.root / "fused.sock"
    client = FusedClient(socket_path, needs=("mount", "passthrough"))
    with pytest.raises(FusedIncompatible) as raised:
        client.views()
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"liftoff fused at {socket_path} is liftoff {__version__} ({API_VERSION}; mount, ")
    assert message.endswith(f"this liftoff {__version__} needs passthrough: upgrade liftoff-fused to this liftoff and restart it")
    assert FusedClient(socket_path, needs=("mount",)).views() == {}


def test_a_client_carries_on_with_a_restarted_daemon(daemon, tmp_path):
    """The snapshotter's client outlives daemon restarts: its next call reaches the new daemon."""
    client, vid = daemon.client, view_id([LAYER], False)
    client.mount(vid, [LAYER], False)
    daemon.process.terminate()
    assert daemon.process.wait(20) == 0
    again = Daemon(tmp_path, daemon.store_url, notify="notify-2.sock")
    try:
        assert client.views() == {vid: pb.ViewSpec(view_id=vid, layers=[LAYER], layers_below=False)}  # restored
        assert (client.mount(vid, [LAYER], False) / "app" / "a.txt").read_bytes() == FILES[b"app/a.txt"]
    finally:
        again.client.shutdown()
        again.stop()


class OlderDaemon(pb_grpc.FusedServicer):
    """The contract as a daemon of an older build with fewer capabilities serves it."""

    def GetVersion(self, request, context):
        return pb.GetVersionResponse(build_version="0.0.9", api_versions=[API_VERSION], capabilities=["mount", "views"])

    def ListViews(self, request, context):
        return pb.ListViewsResponse()


def test_a_daemon_replaced_by_another_version_is_checked_again(daemon):
    """A client checked the daemon once; the daemon is then replaced by an older one that lacks a
    capability the client needs: its next call names both versions instead of going on."""
    socket_path = daemon.root / "fused.sock"
    client = FusedClient(socket_path, needs=SNAPSHOTTER_NEEDS)
    assert client.views() == {}
    daemon.client.shutdown()  # another client: this one's connection just drops
    assert daemon.process.wait(20) == 0
    older = grpc.server(ThreadPoolExecutor(2))
    pb_grpc.add_FusedServicer_to_server(OlderDaemon(), older)
    older.add_insecure_port(f"unix:{socket_path}")
    older.start()
    try:
        with pytest.raises(FusedIncompatible) as raised:
            client.views()
        assert str(raised.value) == (
            f"liftoff fused at {socket_path} is liftoff 0.0.9 ({API_VERSION}; mount, views); this liftoff {__version__} "
            "needs prefetch, unmount, retain: upgrade liftoff-fused to this liftoff and restart it"
        )
    finally:
        older.stop(0)


def test_malformed_requests_are_refused(daemon):
    client = daemon.client
    with pytest.raises(LiftoffError, match=r"Mount failed: view id '0+' does not match its layers"):
        client.mount("0" * 24, [LAYER], False)
    with pytest.raises(LiftoffError, match="Mount failed: layer 'latest' is not a sha256 digest"):
        client.mount(view_id(["latest"], False), ["latest"], False)
    missing = "sha256:" + "ab" * 32
    with pytest.raises(LiftoffError, match=f"Mount failed: no local index for layer {missing}: pull the image again"):
        client.mount(view_id([missing], False), [missing], False)
    with pytest.raises(LiftoffError, match="malformed profile chunk"):
        client.prefetch("sha256:" + "f0" * 32, [{"sha256": "xyz", "size": 1}])
    stub = pb_grpc.FusedStub(grpc.insecure_channel(f"unix:{daemon.root / 'fused.sock'}"))
    with pytest.raises(grpc.RpcError) as raised:
        stub.Prefetch(pb.PrefetchRequest(image="x", profile=[pb.ProfileChunk(sha256=b"short", size=1)]), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client.views() == {}  # and the daemon still serves


def test_a_daemon_that_does_not_speak_the_contract_is_named(tmp_path):
    """Something that accepts connections on the socket but answers no gRPC (an older liftoff fused
    spoke JSON lines there): the client says so within its probe timeout instead of hanging."""
    path = tmp_path / "fused.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen()
    try:
        started = time.monotonic()
        with pytest.raises(FusedIncompatible, match=r"accepts connections but does not speak liftoff\.fused\.v1 \(a liftoff"):
            FusedClient(path).check(("mount",))
        assert time.monotonic() - started < 15
    finally:
        listener.close()
    with pytest.raises(FusedUnavailable, match="is not running at"):
        FusedClient(path).check(("mount",))
