"""FUSE passthrough (Linux 6.9+): the kernel serves an open file's reads and mmaps from a local
backing file, with no request to the daemon.

A file qualifies once every byte of it is local: its backing file is assembled from verified
cached chunks (copy_file_range, no bytes through Python) into a root-only 0600 file, written to a
temp name and renamed, so no reader ever sees a hole (a hole would read as zeros). Backing files
live under `files/<boot id>/<layer>/<digest of the file's extents>`: a file of an earlier boot may be torn (no fsync; the
rename can reach the disk before the data), so a start removes every other boot's directory; the
same boot's files (a daemon restart) were complete when renamed and are used as they are.

The kernel's rules shape the rest (fs/fuse/iomode.c): an inode open in passthrough mode takes only
passthrough opens, with the same backing file (anything else fails the open with EIO), and one
open in cached mode keeps it out of passthrough until that open is released. `InodeStates` keeps
both facts per inode (the backing id registered for it, the cached opens outstanding) in a shared
mapping of a root-only file next to the view's record: written before each reply, it survives a
crash of the daemon, so the next daemon re-uses the same backing ids (the kernel keeps them with the
connection: nobody else can close them) and never puts an inode in a mode the kernel would refuse.
Every update errs on the safe side: a crash between the update and the reply leaves an inode
counted as open in cached mode, which only keeps it out of passthrough for that connection.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import mmap
import os
import secrets
import shutil
import struct
from pathlib import Path

from layerstore.cache import ChunkCache
from layerstore.private import private_dir
from snapshotter import fuse_kernel as k
from snapshotter.fuse_tree import Node, View

log = logging.getLogger(__name__)

TMP_MARK = ".tmp-"
_SLOT = 8  # bytes per inode: backing id (int32), cached opens (int32)


def boot_id() -> str:
    """This boot's id (files written before a crash of the machine are not trusted)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")
    except OSError:
        return "unknown-boot"


class BackingFiles:
    """Whole files assembled from cached chunks, for passthrough: `files/<boot>/<layer>/<extents digest>`."""

    def __init__(self, root: str | os.PathLike[str], cache: ChunkCache) -> None:
        top = private_dir(root)
        boot = boot_id()
        for entry in os.scandir(top):
            if entry.name != boot:
                shutil.rmtree(entry.path, ignore_errors=True)  # an earlier boot's files may be torn
        self.dir = private_dir(top / boot)
        self.cache = cache
        self.assembled = 0  # files this process assembled
        self.assembled_bytes = 0

    def path(self, view: View, node: Node) -> Path:
        """Named by the file's extents (chunk, offset, length each): the same extents are the same bytes.
        Not by its path: within one layer a path can name two files (a hardlink to an entry that a later
        entry of the same path replaces)."""
        index = view.layers[node.layer]
        h = hashlib.sha256(struct.pack("<Q", node.size))
        for chunk, offset, length in view.spans(node):
            h.update(chunk.sha256 + struct.pack("<QQ", offset, length))
        return self.dir / (index.layer_digest.split(":")[-1] or "unknown") / h.hexdigest()

    def missing(self, view: View, node: Node) -> list[tuple[bytes, int]]:
        """The chunks of the file not in the cache: (sha256, size) each."""
        seen: dict[bytes, int] = {}
        for chunk, _, _ in view.extents_for(node, 0, node.size):
            if chunk.sha256 not in seen and chunk.sha256 not in self.cache:
                seen[chunk.sha256] = chunk.size
        return list(seen.items())

    def get(self, view: View, node: Node) -> Path | None:
        """The file's backing file, assembled now if every chunk of it is cached; None if not."""
        path = self.path(view, node)
        if path.exists():
            return path
        pieces = view.extents_for(node, 0, node.size)
        if not all(chunk.sha256 in self.cache for chunk, _, _ in pieces):
            return None
        private_dir(path.parent)
        tmp = path.with_name(f"{path.name}{TMP_MARK}{secrets.token_hex(4)}")
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            written = 0
            for chunk, start, length in pieces:
                source = self.cache.open_verified(chunk.sha256)
                if source is None:  # evicted or corrupt meanwhile
                    return None
                try:
                    position = start
                    while position < start + length:
                        done = os.copy_file_range(source, out, start + length - position, position)
                        if done <= 0:
                            return None  # the chunk is shorter than its index says: leave the file alone
                        position += done
                finally:
                    os.close(source)
                written += length
            if written != node.size:
                return None
            os.rename(tmp, path)
            tmp = None  # type: ignore[assignment]
        finally:
            os.close(out)
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        self.assembled += 1
        self.assembled_bytes += node.size
        return path

    def retain(self, layers: set[str]) -> int:
        """Remove the backing files of layers not listed (digests); returns how many layer directories."""
        keep = {d.split(":")[-1] for d in layers}
        removed = 0
        for entry in os.scandir(self.dir):
            if entry.name not in keep:
                shutil.rmtree(entry.path, ignore_errors=True)  # files the kernel holds stay readable to it
                removed += 1
        return removed


def register(fuse_fd: int, path: Path) -> int:
    """Register `path` as a backing file on the connection; returns its backing id. OSError when the
    kernel refuses (EPERM: no CAP_SYS_ADMIN or no passthrough; ELOOP: the file is on a stacked fs)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        request = bytearray(k.BACKING_MAP.pack(fd, 0, 0))
        backing_id = fcntl.ioctl(fuse_fd, k.DEV_IOC_BACKING_OPEN, request, True)  # returns the ioctl's value
    finally:
        os.close(fd)
    if backing_id <= 0:
        raise OSError(errno.EINVAL, f"BACKING_OPEN returned {backing_id}")
    return backing_id


class InodeStates:
    """Per inode of a view: its backing id (0: none) and its cached-mode opens, in a shared
    mapping of a root-only file that outlives the daemon (see the module's docstring)."""

    def __init__(self, path: Path, slots: int, fresh: bool) -> None:
        size = max(1, slots) * _SLOT
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if fresh else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if fresh:
                os.ftruncate(fd, size)
            elif os.fstat(fd).st_size != size:
                raise ValueError(f"{path} holds {os.fstat(fd).st_size // _SLOT} inodes, the view {slots}")
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._slots = memoryview(self._map).cast("i")
        self.path = path

    def backing(self, ino: int) -> int:
        return self._slots[2 * ino]

    def set_backing(self, ino: int, backing_id: int) -> None:
        self._slots[2 * ino] = backing_id

    def cached_opens(self, ino: int) -> int:
        return self._slots[2 * ino + 1]

    def add_cached(self, ino: int, delta: int) -> None:
        self._slots[2 * ino + 1] = max(0, self._slots[2 * ino + 1] + delta)

    def registered(self) -> int:
        return sum(1 for i in range(0, len(self._slots), 2) if self._slots[i] > 0)
