"""The FUSE daemon crashes, restarts and upgrades under running containers, and none of them sees
an error: its views' /dev/fuse descriptors outlive it (in `liftoff fdholder`, or systemd's fd
store: here a stand-in that speaks systemd's documented protocol, as systemd is not PID 1 in this
sandbox), a new daemon re-attaches to the same connections and the kernel resends what the dead
one had read but not answered.

Three containers of three images (a shared base layer with busybox and a static reader, an app
layer of its own each) read and checksum files in a loop, through read(2) or mmap(2), dropping
the pages after each file so that every pass asks the daemon again; one walks files never read
before, from a store slowed by a relay, so fetches are in flight when the daemon is killed.
Every line a reader prints is checked: no read error, no wrong byte, and the longest gap between
two lines, or since its last line for a reader still waiting (the stall), stays under 2 s. The two
readers of cached files finish a first pass (which fetches their files) before any fault starts."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from layerstore.procs import Service, spawn, wait_for_socket
from liftoff.devstack.ocibuild import Member, make_tar
from snapshotter.fuse_control import FusedClient, FusedUnavailable
from snapshotter.fuse_server import lazy_unmount
from snapshotter.fuse_tree import View
from snapshotter.fused.indexes import IndexDir
from snapshotter.fused.views import Views, inode_digest
from tests.faultproxy import FaultProxy
from tests.remote.conftest import Image, build_image, convert, liftoff_pull, start_stack
from tests.remote.helpers import erofs_mounts, file_backed_erofs
from tests.snapshotter.helpers import APPLETS, BUSYBOX

MAX_STALL_MS = 2000
UNCACHED_FILES = 100  # per image, 48 KiB each: one 64 KiB chunk per file
FETCH_DELAY = 0.25  # seconds the relay holds every chunk GET
RESULTS: dict[str, dict] = {}


def _fnv(data: bytes) -> str:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


@pytest.fixture(scope="module")
def reader_binary(tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("reader") / "reader"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(out), str(Path(__file__).with_name("reader.c"))], check=True)
    return out.read_bytes()


@dataclass
class LayeredImage:
    image: Image
    files: dict[str, bytes]  # path in the container -> content


@pytest.fixture(scope="module")
def images(registry, tmp_path_factory, reader_binary) -> list[LayeredImage]:
    base = make_tar(
        [
            Member("bin", "dir"),
            Member("bin/busybox", data=BUSYBOX.read_bytes(), mode=0o755),
            *[Member(f"bin/{a}", "symlink", linkname="busybox") for a in APPLETS],
            Member("bin/reader", data=reader_binary, mode=0o755),
        ]
    )
    out = []
    for n in range(3):
        rng = random.Random(1000 + n)
        files = {f"/data{n}/f{i:03d}": rng.randbytes(48 << 10) for i in range(UNCACHED_FILES)}
        app = make_tar([Member(f"data{n}", "dir"), *[Member(p[1:], data=d) for p, d in files.items()]])
        out.append(LayeredImage(build_image(tmp_path_factory, registry, f"restart{n}", [base, app]), files))
    return out


@dataclass
class Reader:
    name: str
    files: list[str]
    expected: dict[str, str]
    process: subprocess.Popen
    out: Path
    container: str  # its container's id: unique, as runc's state directory is shared by every containerd here

    def lines(self) -> list[tuple[int, str, str]]:
        parsed = []
        for line in self.out.read_text(errors="replace").splitlines():
            parts = line.split(" ", 2)
            if len(parts) == 3 and parts[0].isdigit():
                parsed.append((int(parts[0]), parts[1], parts[2]))
        return parsed


@dataclass
class Node:
    """A stack whose FUSE daemon keeps its connections in an fd holder (the Kubernetes arrangement)."""

    stack: object
    proxy: FaultProxy
    workdir: Path
    fused_args: list[str]
    holder: Service | None = None
    fused: Service | None = None
    readers: list[Reader] = field(default_factory=list)
    restarts: list[float] = field(default_factory=list)  # seconds from kill to a daemon answering

    @property
    def root(self) -> Path:
        return self.workdir / "root" / "remote"

    def client(self) -> FusedClient:
        return FusedClient(self.root / "fused.sock", timeout=30)

    def start_fused(self, *extra: str, env: dict | None = None, wait: bool = True) -> Service:
        argv = [sys.executable, "-m", "liftoff", "--log-level", "info", "fused", "--root", str(self.root)]
        self.fused = spawn("fused", [*argv, *self.fused_args, *extra], self.workdir, env={**os.environ, **(env or {})})
        if wait:
            wait_for_socket(self.root / "fused.sock", self.fused, 30)
        return self.fused

    def kill_fused(self) -> None:
        assert self.fused is not None
        self.fused.process.send_signal(signal.SIGKILL)
        self.fused.process.wait()

    def start_reader(self, image: LayeredImage, name: str, mode: str, files: list[str], pause_ms: int = 20) -> Reader:
        out = self.workdir / f"reader-{name}.out"
        argv = ["ctr", "--address", self.stack.containerd.address, "run", "--rm", "--snapshotter", "liftoff"]
        container = f"{name}-{self.workdir.name}-{os.getpid()}"
        argv += [image.image.ref, container, "/bin/reader", mode, str(pause_ms), *files]
        with open(out, "wb") as sink:
            process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        reader = Reader(name, files, {p: _fnv(image.files[p]) for p in files}, process, out, container)
        self.readers.append(reader)
        deadline = time.monotonic() + 60
        while not reader.lines():
            assert process.poll() is None, out.read_text()
            assert time.monotonic() < deadline, "the reader never read"
            time.sleep(0.05)
        return reader

    def stop_readers(self) -> None:
        for reader in self.readers:
            subprocess.run(
                ["ctr", "--address", self.stack.containerd.address, "task", "kill", "-s", "SIGKILL", reader.container],
                capture_output=True,
            )
        for reader in self.readers:
            reader.process.wait(60)

    def verdict(self, since_ms: int = 0) -> dict:
        """Lines, read errors, wrong checksums and the longest stall over all readers (after `since_ms`,
        up to now for a reader still running: one stuck since its last line has not finished stalling)."""
        total = errors = wrong = 0
        stall = 0
        problems = []
        now = now_ms()
        for reader in self.readers:
            lines = [line for line in reader.lines() if line[0] >= since_ms]
            for (t0, _, _), (t1, _, _) in itertools.pairwise(lines):
                stall = max(stall, t1 - t0)
            if reader.process.poll() is None:  # a stall still going on counts too: to now, from its last line
                stall = max(stall, now - (lines[-1][0] if lines else since_ms))
            for _t, path, result in lines:
                total += 1
                if result.startswith("ERR"):
                    errors += 1
                    problems.append((reader.name, path, result))
                elif result != reader.expected[path]:
                    wrong += 1
                    problems.append((reader.name, path, result))
            if reader.process.poll() not in (None, 137, -9) and not lines:
                problems.append((reader.name, "exited", reader.process.returncode))
        return {"reads": total, "errors": errors, "wrong": wrong, "max_stall_ms": stall, "problems": problems[:5]}


def now_ms() -> int:
    return int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1000)


@pytest.fixture
def node(tmp_path_factory, s3_server, s3_store_url, images):
    yield from _node(tmp_path_factory, s3_server, s3_store_url, images)


@pytest.fixture
def erofs_node(tmp_path_factory, s3_server, s3_store_url, images):
    """A node whose daemon serves EROFS views (file-backed EROFS over a FUSE blob, Linux 6.12+)."""
    yield from _node(tmp_path_factory, s3_server, s3_store_url, images, ["--erofs"])


def _node(tmp_path_factory, s3_server, s3_store_url, images, extra: list[str] | None = None):
    for image in images:
        convert(image.image, s3_store_url, "--chunk-size", "64K")
    port = int(s3_server.endpoint.rsplit(":", 1)[1])
    proxy = FaultProxy(("127.0.0.1", port), match=lambda head: b"/chunks/" in head, delay_seconds=FETCH_DELAY)
    proxy.always("delay")
    relayed = s3_store_url.replace("?", f"?endpoint_url={proxy.endpoint}&")
    workdir = tmp_path_factory.mktemp("fused-restart")
    holder_socket = workdir / "holder" / "fdholder.sock"
    holder = spawn("fdholder", [sys.executable, "-m", "liftoff", "fdholder", "--socket", str(holder_socket)], workdir)
    wait_for_holder(holder_socket, holder)
    fused_args = ["--store", relayed, "--fetch-retry-seconds", "60", "--fd-holder", str(holder_socket), *(extra or [])]
    n = Node(None, proxy, workdir, fused_args, holder=holder)
    n.start_fused()
    n.stack = start_stack(workdir, relayed, "--no-start-fused")
    for image in images:
        liftoff_pull(n.stack, image.image.ref)
    yield n
    n.stop_readers()
    n.stack.containerd.stop()
    n.stack.snapshotter.stop()
    if n.fused is not None and n.fused.process.poll() is None:
        n.client().shutdown()
        n.fused.process.wait(30)
    holder.stop()
    proxy.stop()
    for mountpoint in mounts_under(workdir):  # views a test left with no daemon (their connections ended)
        lazy_unmount(mountpoint)


def mounts_under(top: Path) -> list[str]:
    """Mount points below `top`, deepest first."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return sorted((p for p in points if p.startswith(f"{top}/")), key=len, reverse=True)


def wait_for_holder(path: Path, holder: Service, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert holder.process.poll() is None, holder.log()
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
            try:
                probe.connect(str(path))
                return
            except OSError:
                assert time.monotonic() < deadline, holder.log()
                time.sleep(0.05)


def start_readers(node: Node, images: list[LayeredImage]) -> None:
    """Three containers: cached reads (read), cached reads through mmap, and a walk of uncached files."""
    hot = [f"/data0/f{i:03d}" for i in range(6)]
    cached = [
        node.start_reader(images[0], "hot-read", "read", hot),
        node.start_reader(images[1], "mmap", "mmap", [f"/data1/f{i:03d}" for i in range(6)]),
    ]
    node.start_reader(images[2], "cold", "read", sorted(images[2].files), pause_ms=0)
    node.start_reader(images[1], "cold-mmap", "mmap", [f"/data1/f{i:03d}" for i in range(6, UNCACHED_FILES)], pause_ms=0)
    # The "cached" readers' first pass fetches their files through the slowed store (~0.3 s a file): only
    # once it is over are their reads cached ones. Started before it was, a fault caught the mmap reader
    # fetching its last file, which waited (rightly) for the store: the 4-7 s stall once taken for a defect.
    deadline = time.monotonic() + 60
    for reader in cached:
        while {path for _, path, _ in reader.lines()} != set(reader.files):
            assert reader.process.poll() is None, reader.out.read_text()
            assert time.monotonic() < deadline, f"{reader.name} never read all its files"
            time.sleep(0.05)


def kill_and_restart(node: Node, times: int, pause: tuple[float, float] = (0.3, 0.8)) -> None:
    rng = random.Random(7)
    for _ in range(times):
        time.sleep(rng.uniform(*pause))
        killed = time.monotonic()
        node.kill_fused()
        node.start_fused()
        node.restarts.append(time.monotonic() - killed)


def record(name: str, node: Node, verdict: dict, **extra) -> None:
    restarts = node.restarts or [0.0]
    RESULTS[name] = {
        **verdict,
        "restarts": len(node.restarts),
        "restart_s_max": round(max(restarts), 2),
        "restart_s_mean": round(sum(restarts) / len(restarts), 2),
        **extra,
    }
    out = os.environ.get("LIFTOFF_RESTART_RESULTS")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({"test": name, **RESULTS[name]}) + "\n")
    print(name, RESULTS[name])


def stall_bound_ms(node: Node) -> float:
    """A reader's longest stall may not exceed 2 s, or, where starting the new daemon alone took longer
    (Python's start on a busy machine), that restart plus 1 s: readers resume as soon as a daemon serves.
    The absolute stalls are what RESULTS.md records; this bound keeps the suite honest on a loaded CI."""
    return max(MAX_STALL_MS, (max(node.restarts, default=0.0) + 1.0) * 1000)


def assert_clean(verdict: dict, node: Node) -> None:
    assert verdict["errors"] == 0 and verdict["wrong"] == 0, verdict
    assert verdict["max_stall_ms"] < stall_bound_ms(node), verdict


def kill9_under_readers(node: Node, images: list[LayeredImage], times: int, name: str) -> str:
    """Kill -9 the daemon `times` times under the readers, each restart re-attaching the three views;
    records the verdict under `name`, checks it is clean, and returns the daemon's log."""
    start_readers(node, images)
    since = now_ms()
    kill_and_restart(node, times)
    time.sleep(1.0)
    log = (node.workdir / "fused.log").read_text()
    assert log.count("re-attached view") >= times * 3, "every restart re-attached the three views"
    verdict = node.verdict(since)
    record(name, node, verdict)
    assert_clean(verdict, node)
    return log


def test_kill9_twenty_times_under_running_containers(node, images):
    kill9_under_readers(node, images, 20, "kill -9 x20 (fd holder)")
    cold = next(r for r in node.readers if r.name == "cold")
    assert len({path for _, path, _ in cold.lines()}) > 20, "the cold reader walked files fetched during the kills"


@pytest.mark.skipif(bool(file_backed_erofs()), reason=file_backed_erofs() or "-")
def test_kill9_under_running_containers_with_erofs_views(erofs_node, images):
    """EROFS views survive the daemon too: the kernel keeps each image mounted, the blob's connection
    waits in the fd holder, and a new daemon serves the blobs again (same layout, checked by digest)."""
    node = erofs_node
    assert len(erofs_mounts(node.workdir)) == 3, "the three views are EROFS images"
    log = kill9_under_readers(node, images, 10, "kill -9 x10, EROFS views (fd holder)")
    assert "mounting the view afresh" not in log
    assert len(erofs_mounts(node.workdir)) == 3


def test_upgrade_handover(node, images):
    start_readers(node, images)
    since = now_ms()
    for n in range(5):
        time.sleep(0.5)
        old = node.fused
        started = time.monotonic()
        version = f"9.9.{n}-upgrade"
        new = node.start_fused("--takeover", env={"LIFTOFF_FUSED_BUILD_VERSION": version}, wait=False)
        old.process.wait(60)
        assert old.process.returncode == 0, old.log()[-2000:]
        deadline = time.monotonic() + 30
        while True:
            try:
                if node.client().version().build_version == version:
                    break
            except Exception:
                pass
            assert new.process.poll() is None and time.monotonic() < deadline, new.log()[-3000:]
            time.sleep(0.02)
        node.restarts.append(time.monotonic() - started)
    time.sleep(1.0)
    assert (node.workdir / "fused.log").read_text().count("handed 3 views over") == 5
    verdict = node.verdict(since)
    record("upgrade handover x5 (--takeover)", node, verdict)
    assert_clean(verdict, node)
    # the mounts were never unmounted: the views are the same connections
    assert len(node.client().views()) == 3


def test_oom_killed_daemon(node, images):
    cgroup = Path("/sys/fs/cgroup/memory") / f"liftoff-oom-{os.getpid()}"
    if not cgroup.parent.is_dir():
        pytest.skip("no cgroup v1 memory controller")
    start_readers(node, images)
    since = now_ms()
    for _ in range(3):
        cgroup.mkdir()
        try:
            (cgroup / "cgroup.procs").write_text(str(node.fused.process.pid))
            usage = int((cgroup / "memory.usage_in_bytes").read_text())
            (cgroup / "memory.limit_in_bytes").write_text(str(usage + (64 << 10)))  # new memory is charged here
            killed = time.monotonic()
            for _ in range(20):  # and requests need new memory
                try:
                    node.client().status()
                except FusedUnavailable:
                    break  # killed already
            node.fused.process.wait(60)  # the readers' fetches need memory: the cgroup's OOM killer strikes
            assert node.fused.process.returncode == -signal.SIGKILL
            assert "oom_kill 1" in (cgroup / "memory.oom_control").read_text()
        finally:
            if node.fused.process.poll() is None:
                node.kill_fused()
            for _ in range(100):
                try:
                    cgroup.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)
        node.start_fused()
        node.restarts.append(time.monotonic() - killed)
        time.sleep(1.0)
    verdict = node.verdict(since)
    record("OOM kill x3 (memory cgroup v1)", node, verdict)
    assert verdict["errors"] == 0 and verdict["wrong"] == 0, verdict
    # the stall includes the OOM killer's own reclaim before the kill; restarts themselves are bounded
    assert max(node.restarts) < MAX_STALL_MS / 1000 + 5, node.restarts


def test_snapshotter_and_daemon_killed_with_the_store_unreachable(node, images):
    """Reads of cached files go on through the outage, through read(2) on a view of their own and through
    mmap(2) on a view whose other reader waits on the store. (A 4-7 s stall of the mmap reader, once taken
    for a defect in the shared FUSE connection, was the test's: a per-request trace of fused showed the
    stalled READ was of the reader's sixth file, read for the first time, not cached, sent to the fetch
    pool and answered when the store's backoff ended; its first pass had not finished when the faults
    began. Most runs hid it: a stall still open when the verdict was taken was not counted.)"""
    start_readers(node, images)
    since = now_ms()
    for _ in range(3):
        time.sleep(0.5)
        node.proxy.clear()
        node.proxy.always("503")  # the store answers nothing useful during the restart
        node.stack.snapshotter.process.kill()
        killed = time.monotonic()
        node.kill_fused()
        node.start_fused()
        node.restarts.append(time.monotonic() - killed)
        node.stack.restart_snapshotter(kill=True)
        time.sleep(0.5)
        node.proxy.clear()
        node.proxy.always("delay")
    time.sleep(1.0)
    verdict = node.verdict(since)
    # reads of cached data never stopped; reads of chunks not cached waited for the store, without error
    hot = {r.name: r for r in node.readers}
    cached = Node(node.stack, node.proxy, node.workdir, [], readers=[hot["hot-read"]]).verdict(since)
    mmapped = Node(node.stack, node.proxy, node.workdir, [], readers=[hot["mmap"]]).verdict(since)
    record(
        "snapshotter + daemon kill -9 x3, store unreachable",
        node,
        verdict,
        cached_max_stall_ms=cached["max_stall_ms"],
        cached_mmap_max_stall_ms=mmapped["max_stall_ms"],
    )
    assert verdict["errors"] == 0 and verdict["wrong"] == 0, verdict
    assert cached["max_stall_ms"] < stall_bound_ms(node), cached
    # the mmap reader shares its view (one FUSE connection) with the cold-mmap reader, whose reads wait on the store
    assert mmapped["max_stall_ms"] < stall_bound_ms(node), mmapped


def test_inode_numbers_are_stable_and_checked(node, images):
    """The same indexes give the same inode table (digest in the view record); a view whose rebuilt
    table differs is not re-attached: its connection ends and it is mounted afresh."""
    indexes = IndexDir(node.root / "indexes")
    records = {r.spec.view_id: r for r in Views.recorded(_RecordsOnly(node.root / "views"))}  # type: ignore[arg-type]
    assert len(records) == 3
    for record_ in records.values():
        view = View([indexes.load(d) for d in record_.spec.layers], record_.spec.layers_below)
        again = View([indexes.load(d) for d in record_.spec.layers], record_.spec.layers_below)
        assert inode_digest(view) == inode_digest(again) == record_.inodes
        assert record_.init and record_.init["flags"]
    # tamper with one record's digest: the restarted daemon refuses to re-attach that view
    victim = sorted(records)[0]
    path = node.root / "views" / f"{victim}.json"
    doc = json.loads(path.read_text())
    doc["inodes"] = "0" * 64
    path.write_text(json.dumps(doc))
    node.kill_fused()
    node.start_fused()
    log = (node.workdir / "fused.log").read_text()
    assert f"view {victim}: not re-attaching its FUSE connection: its inode table" in log
    assert log.count("re-attached view") == 2
    assert len(node.client().views()) == 3  # mounted afresh
    out = node.stack.containerd.ctr("run", "--rm", "--snapshotter", "liftoff", images[0].image.ref, "after", "ls", "/data0")
    assert "f000" in out


class _RecordsOnly:
    def __init__(self, records: Path) -> None:
        self.records = records


def test_without_resend_a_read_in_flight_blocks(node, images):
    """With --no-resend (as on kernels before 6.9), a read the killed daemon had taken from the queue
    is never answered: its reader blocks (killably) in the kernel while every other read goes on."""
    node.kill_fused()
    node.start_fused("--no-resend")
    hot = node.start_reader(images[0], "hot", "read", [f"/data0/f{i:03d}" for i in range(3)])
    while len(hot.lines()) < 4:  # its files are cached: it asks the daemon, never the store
        time.sleep(0.05)
    node.proxy.clear()
    node.proxy.delay_seconds = 3.0
    node.proxy.always("delay")
    reader = node.start_reader(images[2], "stuck", "read", [f"/data2/f{i:03d}" for i in range(50, 60)], pause_ms=0)
    time.sleep(1.0)  # "stuck" now waits for a 3 s fetch of its next file
    node.kill_fused()
    node.start_fused("--no-resend")
    before = len(reader.lines())
    time.sleep(8.0)
    assert len(reader.lines()) == before, "the read the dead daemon had taken is never answered"
    assert hot.lines()[-1][0] > now_ms() - MAX_STALL_MS, "other reads go on"
    pid = _task_pid(node, reader.container)
    wchan = Path(f"/proc/{pid}/wchan").read_text()
    state = Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    record("no resend: a read in flight at the kill", node, {"blocked_s": 8.0, "wchan": wchan, "state": state})
    assert "fuse" in wchan or "request_wait_answer" in wchan or state in ("D", "S"), (wchan, state)


def _task_pid(node: Node, name: str) -> int:
    out = node.stack.containerd.ctr("task", "ls")
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == name:
            return int(parts[1])
    raise AssertionError(out)


# Run as the service's first program: the stored descriptors (argv[1]) moved to 3, 4, ... and LISTEN_PID set,
# then exec of the service (argv[2:]). A fresh interpreter with one thread; bash leaves out fds >= 10.
_PLACE_FDS = """
import os, sys
for i, fd in enumerate(int(x) for x in sys.argv[1].split(",") if x):
    if fd != 3 + i:
        os.dup2(fd, 3 + i)
        os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execvp(sys.argv[2], sys.argv[2:])
"""


class SystemdStandIn:
    """What systemd does for a Type=notify service with FileDescriptorStoreMax= (sd_notify(3),
    systemd.service(5), sd_listen_fds(3)): a notify socket that takes FDSTORE=1/FDNAME= messages
    with descriptors (SCM_RIGHTS) and FDSTOREREMOVE=1, and on every start of the service passes the
    stored descriptors as fds 3.. with LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID."""

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.fds: list[tuple[str, int]] = []
        self.ready = threading.Event()
        self.messages: list[str] = []
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self) -> None:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 4096, 16)
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(data.decode())
            if fields.get("READY") == "1":
                self.ready.set()
            if fields.get("FDSTORE") == "1":
                for fd in fds:
                    self.fds.append((fields.get("FDNAME", "stored"), fd))
            elif fields.get("FDSTOREREMOVE") == "1":
                keep = []
                for name, fd in self.fds:
                    if name == fields.get("FDNAME"):
                        os.close(fd)
                    else:
                        keep.append((name, fd))
                self.fds = keep
            else:
                for fd in fds:
                    os.close(fd)

    def start(self, argv: list[str], workdir: Path) -> subprocess.Popen:
        """Start the service as systemd does, passing what the store holds. The descriptors are put in place
        by a program of their own (_PLACE_FDS), not by a preexec_fn: Python code between fork and exec in this
        multi-threaded process (gRPC's threads among them) once left a child that never reached exec."""
        self.ready.clear()
        stored = list(self.fds)  # the receiver thread may add to it meanwhile
        high = [os.dup(fd) for _, fd in stored]  # each >= 3 + its index: moving one never overwrites the next
        count = len(high)
        env = {**os.environ, "NOTIFY_SOCKET": str(self.path), "FDSTORE": "4096", "LISTEN_FDS": str(count)}
        env["LISTEN_FDNAMES"] = ":".join(name for name, _ in stored)
        with open(workdir / "fused.log", "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-c", _PLACE_FDS, ",".join(map(str, high)), *argv],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                pass_fds=high,
            )
        for fd in high:
            os.close(fd)
        assert self.ready.wait(60), "the service never sent READY=1"
        return process


def test_systemd_fd_store_protocol(node, images):
    """The same daemon under systemd's fd store (a stand-in speaking systemd's protocol)."""
    node.client().shutdown()  # the fd-holder daemon unmounts its views
    node.fused.process.wait(30)
    systemd = SystemdStandIn(node.workdir)
    args = [a for a in node.fused_args]
    i = args.index("--fd-holder")
    del args[i : i + 2]
    argv = [sys.executable, "-m", "liftoff", "--log-level", "info", "fused", "--root", str(node.root), *args]
    process = systemd.start(argv, node.workdir)
    assert len(systemd.fds) == 3 and all(m.startswith("FDSTORE=1") for m in systemd.messages if "FDNAME" in m)
    start_readers(node, images)
    since = now_ms()
    for _ in range(8):
        time.sleep(random.uniform(0.3, 0.8))
        killed = time.monotonic()
        process.kill()
        process.wait()
        process = systemd.start(argv, node.workdir)  # Restart=on-failure: the store is handed back
        node.restarts.append(time.monotonic() - killed)
    time.sleep(1.0)
    verdict = node.verdict(since)
    record("kill -9 x8 (systemd fd store stand-in)", node, verdict)
    node.fused = Service("fused", process, node.workdir / "fused.log")
    assert_clean(verdict, node)
    assert "fd store: systemd" in (node.workdir / "fused.log").read_text()
    # Shutdown unmounts and drops the stored descriptors (FDSTOREREMOVE=1)
    node.client().shutdown()
    process.wait(30)
    assert systemd.fds == []
