"""Image bytes stay private on the node.

The views, their mount points, the local indexes, the view records and the chunk cache live
under root-only directories (0700; files 0600), as containerd keeps its own snapshotter state;
the FUSE views are mounted nosuid,nodev. A non-root user of the host reaches nothing of an
image, while a container sees exactly what containerd's overlayfs snapshotter shows it: a
setuid-root binary still raises a non-root process's effective uid, and device nodes taken
from the image still work (overlayfs checks both on its own mount, not on its lower layers).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from layerstore.pb.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from liftoff.devstack.ocibuild import LayoutWriter, Member, make_tar
from liftoff.devstack.services import push_layout
from tests.remote.conftest import Image, Stack, convert, liftoff_pull, start_stack
from tests.remote.helpers import Snapshots
from tests.snapshotter.helpers import APPLETS, BUSYBOX, chain_ids, diff_id

NOBODY = 65534
SECRET = b"liftoff-private-image-bytes\n" * 40000  # ~1 MiB: a chunk of its own


def euid_binary() -> bytes:
    """A static x86-64 ELF that exits with its effective uid (mod 256): 0 when setuid root works."""
    code = bytes.fromhex("b86b0000000f0589c7b83c0000000f05")  # geteuid(); exit(euid)
    base, header_size = 0x400000, 64 + 56
    size = header_size + len(code)
    elf = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    elf += struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, base + header_size, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    elf += struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)
    return elf + code


def privacy_layers() -> list[bytes]:
    """A busybox image with a setuid-root binary, device nodes outside /dev (runc covers /dev) and a secret."""
    return [
        make_tar(
            [
                Member("bin", "dir"),
                Member("bin/busybox", data=BUSYBOX.read_bytes(), mode=0o755),
                *[Member(f"bin/{a}", "symlink", linkname="busybox") for a in [*APPLETS, "wc", "head", "grep"]],
                Member("bin/euid", data=euid_binary(), mode=0o4755),
                Member("nodes", "dir"),
                Member("nodes/null", "char", devmajor=1, devminor=3, mode=0o666),
                Member("nodes/zero", "char", devmajor=1, devminor=5, mode=0o666),
            ]
        ),
        make_tar([Member("secret", "dir"), Member("secret/data", data=SECRET, mode=0o644)]),
    ]


# A non-root process (the image's User) runs this: the setuid binary, both device nodes, a file.
SCRIPT = (
    "/bin/euid; echo euid=$?; id -u; "
    "echo x >/nodes/null && echo null-written; head -c 4 /nodes/zero | wc -c; "
    "sha256sum /secret/data | head -c 16; echo"
)


def _supported() -> None:
    if os.uname().machine != "x86_64":
        pytest.skip("the setuid probe is an x86-64 binary")


@pytest.fixture(scope="module")
def image(registry, tmp_path_factory) -> Image:
    layers = privacy_layers()
    layout = tmp_path_factory.mktemp("layout-privacy")
    writer = LayoutWriter(layout)
    config = {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "User": f"{NOBODY}:{NOBODY}"}
    descriptor = writer.add_image(layers, config=config)
    writer.tag(descriptor, "v1")
    ref = push_layout(layout, "v1", registry.host, "remote-test/privacy")
    ids = [diff_id(t) for t in layers]
    return Image(ref, layout, layers, ids, chain_ids(ids), descriptor["digest"])


@pytest.fixture(scope="module")
def open_stack(tmp_path_factory):
    """A stack whose every directory above the snapshotter's root is open to all (0755), as /var/lib is."""
    workdir = Path(tempfile.mkdtemp(prefix="liftoff-privacy-", dir="/tmp"))
    os.chmod(workdir, 0o755)
    store = tmp_path_factory.mktemp("privacy-store")
    s = start_stack(workdir, f"file://{store}")
    yield s
    s.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def pulled(open_stack: Stack, image: Image) -> Image:
    convert(image, open_stack.store_url)
    result = liftoff_pull(open_stack, image.ref)
    assert [layer["state"] for layer in result["layers"]] == ["remote"] * 2
    open_stack.containerd.ctr("image", "pull", "--plain-http", "--snapshotter", "overlayfs", image.ref)
    return image


def run_in_container(stack: Stack, image: Image, snapshotter: str, name: str, *flags: str) -> str:
    return stack.containerd.ctr("run", "--rm", "--snapshotter", snapshotter, *flags, image.ref, name, "sh", "-c", SCRIPT)


def fuse_mounts(under: Path) -> list[tuple[str, set[str]]]:
    """(mount point, per-mount and super-block options) of the liftoff FUSE views under `under`."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, sb = left.split(), right.split()
        if sb[0] == "fuse.liftoff" and fields[4].startswith(f"{under}/"):
            out.append((fields[4], set(fields[5].split(",")) | set(sb[2].split(","))))
    return out


PROBE = """
import errno, json, os, sys
out = {}
for path in sys.argv[1:]:
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            os.read(fd, 16)
            os.close(fd)
        out[path] = "read"
    except OSError as e:
        out[path] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(out))
"""


def as_nobody(paths: list[Path]) -> dict[str, str]:
    """What a non-root host user gets trying to read (or list) each path: "read" or the errno name."""
    done = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-I", "-c", PROBE]
        + [str(p) for p in paths],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_container_sees_setuid_and_devices_as_on_overlayfs(open_stack, pulled):
    _supported()
    flags = ("--allow-new-privs",)  # else containerd's no_new_privs stops setuid on any filesystem
    lazy = run_in_container(open_stack, pulled, "liftoff", "privacy-lazy", *flags)
    reference = run_in_container(open_stack, pulled, "overlayfs", "privacy-ref", *flags)
    assert lazy == reference
    assert lazy.splitlines()[:4] == ["euid=0", str(NOBODY), "null-written", "4"], lazy
    assert fuse_mounts(open_stack.root), "the container ran from a FUSE view"


def test_non_root_host_user_reaches_nothing_of_an_image(open_stack, pulled):
    _supported()
    run_in_container(open_stack, pulled, "liftoff", "privacy-read")  # mounts the view, caches chunks
    root = open_stack.root
    remote = root / "remote"
    (view,) = [Path(p) for p, _ in fuse_mounts(root) if p.startswith(str(remote))]
    chunks = sorted((remote / "cache" / "chunks").glob("*/*"))
    indexes = sorted((remote / "indexes").iterdir())
    records = sorted((remote / "views").glob("*.json"))
    assert chunks and len(indexes) == 2 and records
    private = [root, root / "snapshots", root / "metadata.db", remote, remote / "mnt", remote / "cache"]
    private += [view, view / "secret" / "data", view / "nodes" / "null", *chunks, *indexes, *records]
    got = as_nobody(private)
    assert got == {str(p): "EACCES" for p in private}
    # the directories and files themselves are root-only, not just their parents
    for directory in [root, root / "snapshots", remote, *(remote / n for n in ("indexes", "views", "mnt", "cache"))]:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    for chunk_dir in {c.parent for c in chunks} | {remote / "cache" / "chunks"}:
        assert stat.S_IMODE(chunk_dir.stat().st_mode) == 0o700, chunk_dir
    for file in [*chunks, *indexes, *records, root / "metadata.db"]:
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file


def test_views_are_mounted_nosuid_nodev(open_stack, pulled):
    run_in_container(open_stack, pulled, "liftoff", "privacy-mounts")
    mounts = fuse_mounts(open_stack.root)
    assert mounts
    for mountpoint, options in mounts:
        assert {"nosuid", "nodev", "ro"} <= options, (mountpoint, options)
        with pytest.raises(PermissionError):  # even root opens no device through a view
            os.open(Path(mountpoint) / "nodes" / "null", os.O_WRONLY)


@contextmanager
def containerd_mounted(mounts, target: Path):
    """Mount as containerd's mount package does: a read-only bind is bound, then remounted bind,ro."""
    (m,) = mounts
    target.mkdir()
    options = list(m.options)
    if m.type == "bind":
        flags = MS_BIND | (MS_REC if "rbind" in options else 0) | (MS_RDONLY if "ro" in options else 0)
        _mount(m.source, target, "bind", flags, "")
        if flags & MS_RDONLY:
            _mount("", target, "", flags | MS_REMOUNT, "")
    else:
        _mount(m.source, target, m.type, 0, ",".join(options))
    try:
        yield target
    finally:
        subprocess.run(["umount", "-R", str(target)], check=True)


MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC = 1, 32, 4096, 16384
_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: str, target: Path, fstype: str, flags: int, data: str) -> None:
    if _libc.mount(source.encode(), str(target).encode(), fstype.encode(), flags, data.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def test_a_view_snapshot_serves_non_root_readers_as_on_overlayfs(open_stack, pulled):
    """A View of one run of remote layers is a bind mount of the FUSE view itself (containerd's overlayfs
    binds its one layer the same way), so a non-root process using it (say a build step mounting an image
    read-only) reads through the FUSE mount directly: that is why the views keep allow_other. Their
    nosuid,nodev stay behind: containerd's bind,ro remount clears them, as overlayfs never had them."""
    got = {}
    for snapshotter in ("liftoff", "overlayfs"):
        api = Snapshots(open_stack.containerd.address, snapshotter)
        key = f"privacy-view-{snapshotter}"
        request = pb.ViewSnapshotRequest(
            snapshotter=snapshotter, key=key, parent=pulled.chain_ids[-1], labels={"containerd.io/gc.root": "test"}
        )
        mounts = list(api.stub.View(request, metadata=api.md, timeout=60).mounts)
        try:
            with containerd_mounted(mounts, open_stack.workdir / f"view-{snapshotter}") as path:
                probe = as_nobody([path / "secret" / "data", path / "bin", path / "nodes" / "null"])
                got[snapshotter] = {Path(p).relative_to(path).as_posix(): r for p, r in probe.items()}
        finally:
            api.remove(key)
            api.close()
    assert got["liftoff"] == got["overlayfs"] == {"secret/data": "read", "bin": "read", "nodes/null": "read"}


def test_state_an_older_liftoff_left_open_is_made_private_at_start(tmp_path):
    """Directories and files of an older snapshotter root, FUSE daemon and cache are tightened, contents kept."""
    import hashlib

    from layerstore.cache import ChunkCache
    from snapshotter.fused.daemon import FuseDaemon
    from snapshotter.layout import Layout

    root = tmp_path / "root"
    chunk = b"cached image bytes\n"
    digest = hashlib.sha256(chunk).hexdigest()
    files = {
        "metadata.db": b"",
        "remote/indexes/" + "ab" * 32: b"index",
        "remote/views/v.json": b"{}",
        f"remote/cache/chunks/{digest[:2]}/{digest}": chunk,
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        (root / name).write_bytes(data)
        os.chmod(root / name, 0o644)
    for directory in [root, *root.rglob("*")]:
        if directory.is_dir():
            os.chmod(directory, 0o755)
    Layout(root).ensure()
    daemon = FuseDaemon(root / "remote", [], 1 << 20)
    daemon.fetch_pool.shutdown()
    assert daemon.cache.read(bytes.fromhex(digest), 0, len(chunk)) == chunk
    for path in [root, *root.rglob("*")]:
        expected = 0o700 if path.is_dir() else 0o600
        assert stat.S_IMODE(path.lstat().st_mode) == expected, path
    ChunkCache(tmp_path / "fresh", 1 << 20).put(bytes.fromhex(digest), chunk)
    for path in [tmp_path / "fresh", *(tmp_path / "fresh").rglob("*")]:
        assert stat.S_IMODE(path.lstat().st_mode) == (0o700 if path.is_dir() else 0o600), path


def test_a_shared_directory_is_refused_as_a_root(tmp_path):
    from layerstore.errors import LiftoffError
    from layerstore.private import private_dir

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    with pytest.raises(LiftoffError, match="must be a directory of its own"):
        private_dir(shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    made = private_dir(tmp_path / "new" / "remote")
    assert stat.S_IMODE(made.parent.stat().st_mode) == stat.S_IMODE(made.stat().st_mode) == 0o700
