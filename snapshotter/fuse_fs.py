"""The FUSE filesystem of one view (fusepy): metadata from the in-memory tree, data from chunks.

Everything but file data is answered from the tree: lookups, getattr, readdir, readlink
and xattrs never touch the network. The mount is read-only with long kernel entry,
attribute and negative timeouts and `kernel_cache` (layers are immutable).
"""

from __future__ import annotations

import errno
import logging
import os
import stat

import fuse

from layerstore.fetch import ChunkFetcher, ChunkUnavailable
from snapshotter.fuse_tree import Node, View

log = logging.getLogger(__name__)

TIMEOUT = 86400.0  # seconds the kernel may cache entries, attributes and negative lookups
ENCODING = "latin-1"  # maps bytes 1:1 to str: tar names need not be UTF-8


def _name(text: str) -> bytes:
    return text.encode(ENCODING)


class ViewFS(fuse.Operations):
    """fusepy operations over a View."""

    use_ns = True

    def __init__(self, view: View, fetcher: ChunkFetcher, label: str, on_read=None) -> None:
        self.view = view
        self.fetcher = fetcher
        self.label = label
        self.on_read = on_read  # called with (node, offset, length) for recording
        total = sum(n.size for n in view.nodes[1:] if n is not None and stat.S_ISREG(n.mode))
        self._statfs = {
            "f_bsize": 4096,
            "f_frsize": 4096,
            "f_blocks": (total + 4095) // 4096,
            "f_bfree": 0,
            "f_bavail": 0,
            "f_files": len(view.nodes) - 1,
            "f_ffree": 0,
            "f_favail": 0,
            "f_namemax": 255,
        }

    def _node(self, path: str) -> Node:
        node = self.view.resolve(_name(path))
        if node is None:
            raise fuse.FuseOSError(errno.ENOENT)
        return node

    def getattr(self, path: str, fh=None) -> dict:
        node = self._node(path)
        return {
            "st_ino": node.ino,
            "st_mode": node.mode,
            "st_nlink": node.nlink,
            "st_uid": node.uid,
            "st_gid": node.gid,
            "st_size": node.size if not node.is_dir else 4096,
            "st_blocks": (node.size + 511) // 512,
            "st_atime": node.mtime_ns,
            "st_mtime": node.mtime_ns,
            "st_ctime": node.mtime_ns,
            "st_rdev": node.rdev,
        }

    def readdir(self, path: str, fh) -> list:
        node = self._node(path)
        if node.children is None:
            raise fuse.FuseOSError(errno.ENOTDIR)
        return [".", "..", *(name.decode(ENCODING) for name in node.children)]

    def readlink(self, path: str) -> str:
        node = self._node(path)
        if not stat.S_ISLNK(node.mode):
            raise fuse.FuseOSError(errno.EINVAL)
        return node.link.decode(ENCODING)

    def open(self, path: str, flags: int) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise fuse.FuseOSError(errno.EROFS)
        self._node(path)
        return 0

    def read(self, path: str, size: int, offset: int, fh) -> bytes:
        node = self._node(path)
        if not stat.S_ISREG(node.mode):
            raise fuse.FuseOSError(errno.EISDIR if node.is_dir else errno.EINVAL)
        if self.on_read is not None:
            self.on_read(node, offset, size)
        layer = self.view.layers[node.layer].layer_digest if node.layer >= 0 else ""
        try:
            return b"".join(
                self.fetcher.read(chunk.sha256, chunk.size, start, length, layer)
                for chunk, start, length in self.view.extents_for(node, offset, size)
            )
        except ChunkUnavailable as e:
            log.error("%s: read of %s failed: %s", self.label, path, e)
            raise fuse.FuseOSError(errno.EIO) from None

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        node = self._node(path)
        try:
            return node.xattrs[name]
        except KeyError:
            raise fuse.FuseOSError(errno.ENODATA) from None

    def listxattr(self, path: str) -> list[str]:
        return list(self._node(path).xattrs)

    def statfs(self, path: str) -> dict:
        return self._statfs

    def access(self, path: str, amode: int) -> int:
        self._node(path)
        if amode & os.W_OK:
            raise fuse.FuseOSError(errno.EROFS)
        return 0


def serve_view(fs: ViewFS, mountpoint: str) -> None:
    """Mount `fs` at `mountpoint` and serve until it is unmounted (blocks; run it on a thread)."""
    fuse.FUSE(
        fs,
        mountpoint,
        foreground=True,
        encoding=ENCODING,
        ro=True,
        allow_other=True,
        default_permissions=True,
        nosuid=True,  # as the kernel-protocol server mounts views (fuse_server.py)
        nodev=True,
        kernel_cache=True,
        use_ino=True,
        readdir_ino=True,
        entry_timeout=TIMEOUT,
        attr_timeout=TIMEOUT,
        negative_timeout=TIMEOUT,
        max_read=131072,
        fsname=f"liftoff:{fs.label}",
        subtype="liftoff",
    )
