"""A FUSE server for one view, speaking the kernel protocol on /dev/fuse (fuse_kernel.py).

Per mount: a few reader threads take requests from the mount's /dev/fuse descriptor and
answer everything but file data from the in-memory tree. A read whose chunks are all in
the local cache is answered on the reader thread; one that must fetch goes to a shared
fetch pool, which replies when the chunks arrive (FUSE lets replies come in any order),
so a slow store never holds up lookups and other reads.

Negotiated at INIT, when the kernel offers them: no-open and no-opendir (no OPEN/RELEASE
round trips; page cache and directory listings kept), cached symlinks, readdirplus (a
listing carries every entry's attributes), 1 MiB reads, parallel directory operations,
asynchronous reads. Entries, attributes and negative lookups are valid for a day: layers
are immutable. A view in which no file has an xattr answers the first GETXATTR with ENOSYS,
so that the kernel answers overlayfs's trusted.overlay.* questions itself from then on.

Passthrough (Linux 6.9+, fuse_passthrough.py): where the kernel offers it at INIT (and unless
disabled), no-open is NOT asked for, and an OPEN of a file whose bytes are all local is answered
with a backing file the kernel then reads itself: no READ of that file reaches the daemon. A file
with bytes still remote is opened in cached mode and read through the daemon as before. Older
kernels (no PASSTHROUGH in INIT's flags2) get no-open and today's path.

A connection outlives the daemon: the mount's /dev/fuse descriptor is also kept by an fd store
(fused/fdstore.py), and a new daemon attaches to it (`attach`) with what INIT negotiated (the
kernel sends INIT once per connection), then asks the kernel to queue again the requests the
old daemon had read but not answered (NOTIFY_RESEND, Linux 6.9+). `stop_serving` stops
reading and answers what is in flight, for a handover.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import select
import stat
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from layerstore.errors import FormatError
from layerstore.fetch import ChunkFetcher, ChunkUnavailable
from snapshotter import fuse_kernel as k
from snapshotter.fuse_passthrough import BackingFiles, InodeStates, register
from snapshotter.fuse_tree import Node, View

log = logging.getLogger(__name__)

TIMEOUT = 86400  # seconds the kernel may cache entries, attributes and negative lookups
MAX_WRITE = 128 << 10  # read-only: requests stay small
READ_BUFFER = MAX_WRITE + 4096
MAX_PAGES = 256  # 1 MiB per read request
MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
# Views are private to root: the daemon's mounts are read-only, honour no setuid bit and open no
# device node. A container is unaffected: overlayfs checks both on its own mount, not its lowers.
MOUNT_FLAGS = MS_RDONLY | MS_NOSUID | MS_NODEV
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)
NO_REPLY = frozenset({k.FORGET, k.BATCH_FORGET, k.INTERRUPT})  # the kernel expects no answer to these
OPCODE_NAMES = {
    k.LOOKUP: "lookup",
    k.GETATTR: "getattr",
    k.READLINK: "readlink",
    k.OPEN: "open",
    k.READ: "read",
    k.STATFS: "statfs",
    k.RELEASE: "release",
    k.GETXATTR: "getxattr",
    k.LISTXATTR: "listxattr",
    k.FLUSH: "flush",
    k.INIT: "init",
    k.OPENDIR: "opendir",
    k.READDIR: "readdir",
    k.RELEASEDIR: "releasedir",
    k.ACCESS: "access",
    k.INTERRUPT: "interrupt",
    k.IOCTL: "ioctl",
    k.FORGET: "forget",
    k.BATCH_FORGET: "batch_forget",
    k.READDIRPLUS: "readdirplus",
    k.STATX: "statx",
}
_HEADER = struct.Struct("<IIQQ")  # the start of IN_HEADER: len, opcode, unique, nodeid
_HEADER_SIZE = k.IN_HEADER.size
_OUT_HEADER, _OUT_HEADER_SIZE = k.OUT_HEADER.pack, k.OUT_HEADER.size
_NEGATIVE = k.ENTRY_PREFIX.pack(0, 0, TIMEOUT, TIMEOUT, 0, 0) + bytes(k.ATTR.size)
_ATTR_OUT = k.ATTR_OUT_PREFIX.pack(TIMEOUT, 0, 0)
_WANT = (
    k.ASYNC_READ
    | k.ASYNC_DIO
    | k.PARALLEL_DIROPS
    | k.DO_READDIRPLUS
    | k.NO_OPEN_SUPPORT
    | k.NO_OPENDIR_SUPPORT
    | k.MAX_PAGES
    | k.CACHE_SYMLINKS
)

OnRead = Callable[[Node, int, int], None]
FH_UNCOUNTED, FH_CACHED, FH_PASSTHROUGH = 0, 1, 2  # our file handles: how an open was answered
_STRIPES = 64


def opcode_name(opcode: int) -> str:
    """The FUSE opcode's name, for logs and statistics."""
    return OPCODE_NAMES.get(opcode, str(opcode))


def lazy_unmount(path: str | os.PathLike[str]) -> None:
    """Detach a mount (MNT_DETACH): works on dead FUSE mounts and on mounts still in use; a path that
    is not a mount point (EINVAL) or does not exist is left alone. OSError on any other failure."""
    if _libc.umount2(os.fsencode(path), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"umount {path}: {os.strerror(err)}")


def mount_erofs(image: Path, blob: Path, mountpoint: Path, flags: int = MOUNT_FLAGS) -> bool:
    """Mount an EROFS image file-backed (Linux 6.12+) with `blob` as its extra device, reading it with
    direct I/O where the kernel can (`directio`): each file's reads reach the blob's server as they
    are, neither split into pages nor read ahead into the next file's bytes, and cached once (by
    EROFS). Returns whether direct I/O was taken; OSError where the kernel cannot mount it (one
    before 6.12 answers ENOTBLK: it mounts block devices only)."""
    if "," in str(blob):
        raise OSError(errno.EINVAL, f"mount erofs at {mountpoint}: a device path with a comma: {blob}")
    for options in (f"device={blob},directio", f"device={blob}"):
        if _libc.mount(str(image).encode(), str(mountpoint).encode(), b"erofs", flags, options.encode()) == 0:
            return options.endswith("directio")
        err = ctypes.get_errno()
        if err != errno.EINVAL:
            break
    hint = " (file-backed EROFS needs Linux 6.12+ and the image on a disk file system, not tmpfs)" if err == errno.ENOTBLK else ""
    raise OSError(err, f"mount erofs {image} at {mountpoint}: {os.strerror(err)}{hint}")


def _attr(node: Node) -> bytes:
    seconds, nanos = divmod(node.mtime_ns, 1_000_000_000)
    size = node.size if not node.is_dir else 4096
    return k.ATTR.pack(
        node.ino,
        size,
        (size + 511) // 512,
        seconds,
        seconds,
        seconds,
        nanos,
        nanos,
        nanos,
        node.mode,
        node.nlink,
        node.uid,
        node.gid,
        node.rdev,
        4096,
        0,
    )


class FuseSession:
    """Serves one View at one mount point."""

    def __init__(
        self,
        view: View,
        fetcher: ChunkFetcher,
        label: str,
        fetch_pool: ThreadPoolExecutor,
        *,
        readers: int = 4,
        max_readahead: int = 128 << 10,
        on_read: OnRead | None = None,
        backing: BackingFiles | None = None,
        states_path: Path | None = None,
    ) -> None:
        self.view = view
        self.fetcher = fetcher
        self.label = label
        self.pool = fetch_pool
        self.readers = readers
        self.max_readahead = max_readahead
        self.on_read = on_read
        self.fd = -1
        self.mountpoint: Path | None = None
        self.flags = 0  # what INIT negotiated
        self.kernel_minor = 0
        self.kernel_resend = False  # the kernel offered HAS_RESEND at INIT
        # passthrough: offered with `backing` and `states_path`, used when INIT negotiated it
        self.backing = backing if states_path is not None else None
        self.states_path = states_path
        self.passthrough = False
        self.states: InodeStates | None = None
        self.opens = {"passthrough": 0, "cached": 0}  # OPEN answers, by mode
        self._open_locks = [threading.Lock() for _ in range(_STRIPES)]
        self._passthrough_broken = False  # the kernel refused a backing file: no more tries
        self.initialized = threading.Event()
        self.on_gone: Callable[[FuseSession], None] | None = None  # the connection ended (ENODEV)
        self._stopping = False
        self._gone = False
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._inflight = 0  # reads handed to the fetch pool and not answered yet
        self._inflight_done = threading.Condition()
        self.requests: dict[int, int] = {}  # opcode -> count
        self.eio = 0  # requests answered EIO (fused's /metrics)
        self._threads: list[threading.Thread] = []
        self._nodes = view.nodes
        # No file of the view has an xattr: the first GETXATTR is answered ENOSYS, and the kernel
        # answers every later one itself (EOPNOTSUPP, which overlayfs and the capability code read
        # as "none") instead of asking for overlayfs's trusted.overlay.* on every lookup.
        self._no_xattrs = not any(n is not None and n.xattrs for n in view.nodes)
        self._entries: dict[int, bytes] = {}  # ino -> entry_out (valid for as long as we run)
        self.read_inos: set[int] = set()  # inodes a READ asked for (a page fill skips them)
        self._listings: dict[int, list[tuple[bytes, Node]]] = {}
        self._statfs = self._make_statfs()
        self._handlers = {
            k.LOOKUP: self._lookup,
            k.GETATTR: self._getattr,
            k.READLINK: self._readlink,
            k.OPEN: self._open,
            k.OPENDIR: self._opendir,
            k.READ: self._read,
            k.READDIR: self._readdir,
            k.READDIRPLUS: self._readdirplus,
            k.GETXATTR: self._getxattr,
            k.LISTXATTR: self._listxattr,
            k.STATFS: lambda unique, node, body: self._reply(unique, self._statfs),
            k.ACCESS: self._access,
            k.RELEASE: self._release,
            k.RELEASEDIR: lambda unique, node, body: self._reply(unique),
            k.INIT: self._init,
            k.DESTROY: lambda unique, node, body: self._reply(unique),
        }

    # -- mounting --------------------------------------------------------------------------

    def mount(self, mountpoint: Path, timeout: float = 15.0) -> None:
        """Mount at `mountpoint` and start serving; returns once the kernel's INIT is answered."""
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        # allow_other stays: a View snapshot of one run of remote layers is a bind mount of the view
        # itself, used with the reader's own credentials (overlayfs uses the mounter's). The host's
        # non-root users are kept out by the daemon's root-only directories above the mount point.
        options = f"fd={self.fd},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions"
        source = f"liftoff:{self.label}".encode()
        if _libc.mount(source, str(mountpoint).encode(), b"fuse.liftoff", MOUNT_FLAGS, options.encode()) != 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, f"mount of view {self.label} at {mountpoint}: {os.strerror(err)}")
        self.mountpoint = mountpoint
        self._start_readers()
        st = os.stat(mountpoint)  # makes the kernel send INIT; returns once it is answered
        if not self.initialized.wait(timeout):
            raise OSError(errno.ETIMEDOUT, f"view {self.label}: no INIT from the kernel")
        self._set_readahead(st.st_dev)

    def init_state(self) -> dict:
        """What INIT negotiated, for the view's record: a daemon that attaches later gets no INIT."""
        return {"minor": self.kernel_minor, "flags": self.flags, "resend": self.kernel_resend, "passthrough": self.passthrough}

    def attach(self, fd: int, mountpoint: Path, init: dict, resend: bool = True) -> bool:
        """Serve a connection an earlier daemon mounted (its /dev/fuse descriptor `fd`, INIT long
        answered: `init` is what it negotiated). With `resend` and a kernel that has it, the requests
        the old daemon read but never answered are queued again; returns whether that was asked."""
        self.fd = fd
        self.mountpoint = mountpoint
        self.flags = int(init["flags"])
        self.kernel_minor = int(init["minor"])
        self.kernel_resend = bool(init.get("resend"))
        self.passthrough = bool(init.get("passthrough"))
        if self.passthrough:
            # The connection is in passthrough mode whatever this daemon's options: the kernel holds the
            # backing ids the old daemon registered, and the inode states say which inodes use them.
            try:
                if self.states_path is None:
                    raise ValueError("no inode state file given")
                self.states = InodeStates(self.states_path, len(self.view.nodes), fresh=False)
            except (OSError, ValueError) as e:
                log.error("view %s: its passthrough state is unreadable (%s): opens are answered in cached mode", self.label, e)
        self.initialized.set()
        self._start_readers()
        if not (resend and self.kernel_resend):
            return False
        try:
            os.write(fd, k.OUT_HEADER.pack(k.OUT_HEADER.size, k.NOTIFY_RESEND, 0))
        except OSError as e:
            log.warning(
                "view %s: the kernel refused NOTIFY_RESEND (%s): requests in flight at the restart are lost", self.label, e
            )
            return False
        return True

    def _start_readers(self) -> None:
        # Non-blocking, so that readers can be told to stop (handover); a reader polls when idle.
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        for i in range(self.readers):
            thread = threading.Thread(target=self._serve, name=f"fuse-{self.label[:8]}-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop_serving(self, timeout: float) -> int:
        """Stop reading requests (a handover: the connection stays, its queue waits for the next
        daemon), then wait up to `timeout` s for the reads in flight to be answered; returns how
        many were not (the next daemon's NOTIFY_RESEND queues those again)."""
        self._stopping = True
        os.write(self._wake_w, b"x")
        for thread in self._threads:
            thread.join(timeout)
        with self._inflight_done:
            self._inflight_done.wait_for(lambda: self._inflight == 0, timeout)
            return self._inflight

    def _set_readahead(self, device: int) -> None:
        """The kernel caps a FUSE mount's readahead at its default (128 KiB) whatever INIT asks;
        a larger window (1 MiB reads instead of 128 KiB) is set on the mount's backing device."""
        path = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
        try:
            path.write_text(str(self.max_readahead // 1024))
        except OSError as e:
            log.warning(
                "view %s: cannot set readahead to %d KiB (%s): reads stay at 128 KiB", self.label, self.max_readahead // 1024, e
            )

    def unmount(self) -> None:
        """Detach the mount (lazily: containers using it keep it); the reader threads then end."""
        if self.mountpoint is None:
            return
        try:
            lazy_unmount(self.mountpoint)
        except OSError as e:
            log.warning("%s", e)

    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    # -- the request loop ------------------------------------------------------------------

    def _serve(self) -> None:
        # A reader waits (epoll) before each read rather than after a read that found nothing: one
        # system call less per request when requests come one at a time, as a start's do. Requests
        # are read into this reader's own buffer; handlers copy what they keep. (EPOLLEXCLUSIVE, one
        # reader woken per request, measured no cheaper, and the kernel wakes only one for all the
        # requests a NOTIFY_RESEND queues again after a restart.)
        waiter = select.epoll(2)
        buffer = bytearray(READ_BUFFER)
        view = memoryview(buffer)
        buffers = [buffer]
        try:
            waiter.register(self.fd, select.EPOLLIN)
            waiter.register(self._wake_r, select.EPOLLIN)
            fd, header, dispatch, wait = self.fd, _HEADER.unpack_from, self._dispatch, waiter.poll
            while True:
                wait()  # a request (at once while some are queued), the connection's end, or stop_serving
                if self._stopping:
                    return
                try:
                    n = os.readv(fd, buffers)
                except BlockingIOError:
                    continue  # another reader took it
                except OSError as e:
                    if e.errno == errno.ENODEV:  # unmounted and unused, or aborted: the connection is over
                        self._ended()
                        return
                    if e.errno in (errno.EINTR, errno.ENOENT):
                        continue
                    log.error("view %s: reading /dev/fuse: %s", self.label, e)
                    return
                length, opcode, unique, nodeid = header(buffer)
                try:
                    dispatch(opcode, unique, nodeid, view[_HEADER_SIZE : min(length, n)])
                except Exception:
                    # Unanswered, the request would keep its reader in uninterruptible sleep for good.
                    self._failed(unique, opcode)
        finally:
            waiter.close()

    def _ended(self) -> None:
        with self._inflight_done:
            if self._gone:
                return
            self._gone = True
        if self.on_gone is not None:
            self.on_gone(self)

    def _failed(self, unique: int, opcode: int) -> None:
        """A handler raised: log it once and answer EIO (unless the kernel expects no answer)."""
        log.exception("view %s: %s request failed; answered EIO", self.label, opcode_name(opcode))
        if opcode not in NO_REPLY:
            self._reply(unique, error=errno.EIO)

    def _dispatch(self, opcode: int, unique: int, nodeid: int, body: memoryview) -> None:
        requests = self.requests
        requests[opcode] = requests.get(opcode, 0) + 1
        handler = self._handlers.get(opcode)
        if handler is None:
            if opcode in NO_REPLY:
                return  # nodes live as long as the view; interrupted requests just finish
            read_only = opcode in (4, 6, 8, 9, 10, 11, 12, 13, 16, 21, 24, 35, 43, 45)  # would change the tree
            self._reply(unique, error=errno.EROFS if read_only else errno.ENOSYS)
            return
        if opcode == k.INIT:
            handler(unique, None, body)
            return
        nodes = self._nodes
        if 0 < nodeid < len(nodes) and (node := nodes[nodeid]) is not None:
            handler(unique, node, body)
        else:
            self._reply(unique, error=errno.ENOENT)

    def _reply(self, unique: int, *parts: bytes, error: int = 0) -> None:
        if error:
            if error == errno.EIO:
                self.eio += 1
            out = [_OUT_HEADER(_OUT_HEADER_SIZE, -error, unique)]
        elif len(parts) == 1:
            out = [_OUT_HEADER(_OUT_HEADER_SIZE + len(parts[0]), 0, unique), parts[0]]
        else:
            out = [_OUT_HEADER(_OUT_HEADER_SIZE + sum(map(len, parts)), 0, unique), *parts]
        try:
            os.writev(self.fd, out)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV):  # ENOENT: the request was interrupted
                log.warning("view %s: reply failed: %s", self.label, e)

    # -- handlers --------------------------------------------------------------------------

    def _init(self, unique: int, _node, body: memoryview) -> None:
        major, minor, max_readahead, flags = k.INIT_IN.unpack_from(body)
        if major != k.KERNEL_MAJOR:
            self._reply(unique, error=errno.EPROTO)
            return
        want, flags2_out = _WANT, 0
        if flags & k.INIT_EXT and len(body) >= k.INIT_IN.size + k.INIT_IN_FLAGS2.size:
            (flags2,) = k.INIT_IN_FLAGS2.unpack_from(body, k.INIT_IN.size)
            self.kernel_resend = bool(flags2 & k.HAS_RESEND)
            if flags2 & k.PASSTHROUGH and self.backing is not None and self.states_path is not None:
                try:
                    self.states = InodeStates(self.states_path, len(self.view.nodes), fresh=True)
                    flags2_out = k.PASSTHROUGH
                    want &= ~k.NO_OPEN_SUPPORT  # passthrough is given at OPEN: the kernel must ask
                except OSError as e:
                    log.error("view %s: no passthrough (its inode state file: %s)", self.label, e)
        self.flags = flags & want
        self.passthrough = bool(flags2_out)
        self.kernel_minor = min(minor, k.KERNEL_MINOR)
        out = k.INIT_OUT.pack(
            k.KERNEL_MAJOR,
            self.kernel_minor,
            max_readahead,
            self.flags | (k.INIT_EXT if flags2_out else 0),
            64,
            48,
            MAX_WRITE,
            1,
            MAX_PAGES,
            0,
            flags2_out,
            k.MAX_STACK_DEPTH if flags2_out else 0,
        )
        self._reply(unique, out + bytes(k.INIT_OUT_SIZE - len(out)))
        self.initialized.set()
        log.debug("view %s: INIT kernel 7.%d, flags %#x, passthrough %s", self.label, minor, self.flags, self.passthrough)

    def _entry(self, node: Node) -> bytes:
        entry = self._entries.get(node.ino)
        if entry is None:
            entry = self._entries[node.ino] = k.ENTRY_PREFIX.pack(node.ino, 0, TIMEOUT, TIMEOUT, 0, 0) + _attr(node)
        return entry

    def _lookup(self, unique: int, parent: Node, body: memoryview) -> None:
        if parent.children is None:
            self._reply(unique, error=errno.ENOTDIR)
            return
        child = parent.children.get(bytes(body[:-1]))
        self._reply(unique, self._entry(child) if child is not None else _NEGATIVE)

    def _getattr(self, unique: int, node: Node, body: memoryview) -> None:
        self._reply(unique, _ATTR_OUT, self._entry(node)[k.ENTRY_PREFIX.size :])

    def _readlink(self, unique: int, node: Node, body: memoryview) -> None:
        if not stat.S_ISLNK(node.mode):
            self._reply(unique, error=errno.EINVAL)
            return
        self._reply(unique, node.link)

    def _open(self, unique: int, node: Node, body: memoryview) -> None:
        if self.flags & k.NO_OPEN_SUPPORT:
            self._reply(unique, error=errno.ENOSYS)  # from now on the kernel opens without asking
            return
        open_flags = int.from_bytes(body[:4], "little")
        if open_flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            self._reply(unique, error=errno.EROFS)
            return
        if self.states is not None and stat.S_ISREG(node.mode) and node.size > 0:
            self._reply(unique, k.OPEN_OUT.pack(*self._open_mode(node)))
            return
        self._reply(unique, k.OPEN_OUT.pack(FH_UNCOUNTED, k.FOPEN_KEEP_CACHE, 0))

    def _open_mode(self, node: Node) -> tuple[int, int, int]:
        """How to answer an OPEN on a passthrough connection: (fh, open flags, backing id). The inode
        state is updated before the reply (see fuse_passthrough.py)."""
        states = self.states
        assert states is not None
        with self._open_locks[node.ino % _STRIPES]:
            backing_id = states.backing(node.ino)
            if backing_id <= 0 and states.cached_opens(node.ino) == 0 and self.on_read is None:
                backing_id = self._backing_id(node)
            if backing_id > 0:
                self.opens["passthrough"] += 1
                if self.on_read is not None:  # its reads will not reach us: the whole file counts as read
                    self.on_read(node, 0, node.size)
                return FH_PASSTHROUGH, k.FOPEN_PASSTHROUGH, backing_id
            states.add_cached(node.ino, 1)
            self.opens["cached"] += 1
            return FH_CACHED, k.FOPEN_KEEP_CACHE, 0

    def _backing_id(self, node: Node) -> int:
        """Register the file's backing file (assembled if all its bytes are local); 0 if it has none."""
        if self._passthrough_broken or self.backing is None or self.states is None:
            return 0
        try:
            path = self.backing.get(self.view, node)
            if path is None:
                return 0
            backing_id = register(self.fd, path)
        except FormatError:
            return 0  # its extents are corrupt: its reads come to us, and are refused with the reason
        except OSError as e:
            if e.errno in (errno.EPERM, errno.ELOOP, errno.ENOTTY, errno.EOPNOTSUPP):
                self._passthrough_broken = True
                log.error("view %s: the kernel refuses backing files (%s): reads go through the daemon", self.label, e)
            else:
                log.warning("view %s: no backing file for inode %d: %s", self.label, node.ino, e)
            return 0
        self.states.set_backing(node.ino, backing_id)
        return backing_id

    def _release(self, unique: int, node: Node, body: memoryview) -> None:
        (fh,) = k.UNIQUE.unpack_from(body)
        self._reply(unique)
        if fh == FH_CACHED and self.states is not None:  # after the reply: a crash in between over-counts
            with self._open_locks[node.ino % _STRIPES]:
                self.states.add_cached(node.ino, -1)

    def _opendir(self, unique: int, node: Node, body: memoryview) -> None:
        if self.flags & k.NO_OPENDIR_SUPPORT:
            self._reply(unique, error=errno.ENOSYS)
            return
        self._reply(unique, k.OPEN_OUT.pack(0, k.FOPEN_KEEP_CACHE | k.FOPEN_CACHE_DIR, 0))

    def _read(self, unique: int, node: Node, body: memoryview) -> None:
        _fh, offset, size, _flags = k.READ_IN.unpack_from(body)
        if node.children is not None or not stat.S_ISREG(node.mode):
            self._reply(unique, error=errno.EISDIR if node.is_dir else errno.EINVAL)
            return
        try:
            pieces = self.view.extents_for(node, offset, size)
        except FormatError as e:
            log.error("view %s: read of inode %d refused: %s", self.label, node.ino, e)
            self._reply(unique, error=errno.EIO)
            return
        self.read_inos.add(node.ino)
        if self.on_read is not None:
            self.on_read(node, offset, size)
        # Answered here when every piece is cached (one cache look-up each); else on the fetch pool.
        read = self.fetcher.cache.read
        parts = []
        for chunk, start, length in pieces:
            data = read(chunk.sha256, start, length) if chunk is not None else bytes(length)  # None: zeros (a blob's padding)
            if data is None:
                break
            parts.append(data)
        else:
            self.fetcher.stats.cache_hits += len(parts)
            self._reply(unique, *parts)
            return
        with self._inflight_done:
            self._inflight += 1
        self.pool.submit(self._answer_pooled, unique, node, pieces)

    def _answer_pooled(self, unique: int, node: Node, pieces) -> None:
        try:
            self._answer_read(unique, node, pieces)
        finally:
            with self._inflight_done:
                self._inflight -= 1
                self._inflight_done.notify_all()

    def _answer_read(self, unique: int, node: Node, pieces) -> None:
        layer = self.view.layers[node.layer].layer_digest if node.layer >= 0 else ""
        try:
            parts = [
                self.fetcher.read(chunk.sha256, chunk.size, start, length, layer) if chunk is not None else bytes(length)
                for chunk, start, length in pieces
            ]
        except ChunkUnavailable as e:
            log.error("view %s: read of inode %d failed: %s", self.label, node.ino, e)
            self._reply(unique, error=errno.EIO)
            return
        except Exception:  # on the fetch pool nobody else would answer: the reader would wait forever
            self._failed(unique, k.READ)
            return
        self._reply(unique, *parts)

    def _listing(self, node: Node) -> list[tuple[bytes, Node]]:
        listing = self._listings.get(node.ino)
        if listing is None:
            assert node.children is not None
            listing = self._listings[node.ino] = [(b".", node), (b"..", node), *node.children.items()]
        return listing

    def _readdir(self, unique: int, node: Node, body: memoryview, plus: bool = False) -> None:
        if node.children is None:
            self._reply(unique, error=errno.ENOTDIR)
            return
        _fh, offset, size, _flags = k.READ_IN.unpack_from(body)
        out = bytearray()
        listing = self._listing(node)
        for index in range(offset, len(listing)):
            name, child = listing[index]
            dirent = k.DIRENT.pack(child.ino, index + 1, len(name), stat.S_IFMT(child.mode) >> 12) + name
            dirent += bytes(-len(dirent) % 8)
            if plus:
                entry = self._entry(child) if index >= 2 else bytes(k.ENTRY_PREFIX.size + k.ATTR.size)  # . and ..: no entry
                dirent = entry + dirent
            if len(out) + len(dirent) > size:
                break
            out += dirent
        self._reply(unique, bytes(out))

    def _readdirplus(self, unique: int, node: Node, body: memoryview) -> None:
        self._readdir(unique, node, body, plus=True)

    def _xattr_reply(self, unique: int, value: bytes, size: int) -> None:
        if size == 0:
            self._reply(unique, k.GETXATTR_OUT.pack(len(value), 0))
        elif size < len(value):
            self._reply(unique, error=errno.ERANGE)
        else:
            self._reply(unique, value)

    def _getxattr(self, unique: int, node: Node, body: memoryview) -> None:
        if self._no_xattrs:
            self._reply(unique, error=errno.ENOSYS)
            return
        size, _ = k.GETXATTR_IN.unpack_from(body)
        name = bytes(body[k.GETXATTR_IN.size :]).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        value = node.xattrs.get(name)
        if value is None:
            self._reply(unique, error=errno.ENODATA)
            return
        self._xattr_reply(unique, value, size)

    def _listxattr(self, unique: int, node: Node, body: memoryview) -> None:
        size, _ = k.GETXATTR_IN.unpack_from(body)
        names = b"".join(name.encode("utf-8", "surrogateescape") + b"\0" for name in node.xattrs)
        self._xattr_reply(unique, names, size)

    def _access(self, unique: int, node: Node, body: memoryview) -> None:
        mask = int.from_bytes(body[:4], "little")
        self._reply(unique, error=errno.EROFS if mask & os.W_OK else 0)

    def _make_statfs(self) -> bytes:
        nodes = [n for n in self.view.nodes[1:] if n is not None]
        blocks = sum((n.size + 4095) // 4096 for n in nodes if stat.S_ISREG(n.mode))
        packed = k.KSTATFS.pack(blocks, 0, 0, len(nodes), 0, 4096, 255, 4096)
        return packed + bytes(k.KSTATFS_SIZE - len(packed))
