"""An EROFS metadata image of a view, so that the kernel answers every lookup, stat, listing,
readlink and xattr question itself, and asks liftoff only for file bytes.

The image holds the whole tree of a `fuse_tree.View` (inodes, directories, symlink targets,
xattrs, overlay whiteouts and opaque markers) and no file data: each regular file is one
chunk on an extra device, the view's *blob*, a sparse address space in which every file
starts on a 4 KiB block (`BlobLayout`). liftoff serves the blob through FUSE (`BlobView`),
mapping each block back to the file's chunks. Linux 6.12+ mounts the image file-backed:
`mount -t erofs IMAGE` with `device=BLOB`, by mount(2) on the image file itself.

On-disk format: Linux's fs/erofs/erofs_fs.h. Every inode is the 64-byte extended form
(32-bit owners, nanosecond mtimes, 64-bit sizes); a directory is sorted dirents, inline after
its inode when they fit in one block (its size is then their bytes, as mkfs.erofs makes it),
else in whole blocks of the data area; symlink targets are inline too; files are chunk-based
with one 8-byte chunk index pointing at device 1.
"""

from __future__ import annotations

import bisect
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

from layerstore.private import write_private
from snapshotter.fuse_tree import Node, View

BLOCK = 4096
BLOCK_BITS = 12
SUPER_OFFSET = 1024
MAGIC = 0xE0F5E1E2
FEATURE_INCOMPAT_CHUNKED_FILE = 0x4
FEATURE_INCOMPAT_DEVICE_TABLE = 0x8
CHUNK_FORMAT_INDEXES = 0x20
LAYOUT_FLAT_PLAIN, LAYOUT_FLAT_INLINE, LAYOUT_CHUNK_BASED = 0, 2, 4
INODE_EXTENDED = 1
INODE_SLOT = 32  # nid = byte offset in the metadata area / 32
DEVICE_SLOT = 128
DEVICE_SLOT_OFFSET = SUPER_OFFSET + 128  # the device table right after the superblock
_SUPER = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB23s")
_INODE = struct.Struct("<HHHHQIIIIQII16s")  # erofs_inode_extended, i_u as one u32
_XATTR_HEADER = struct.Struct("<IB7s")
_XATTR_ENTRY = struct.Struct("<BBH")
_CHUNK_INDEX = struct.Struct("<HHI")
_DIRENT = struct.Struct("<QHBB")
_DEVICE = struct.Struct("<64sII56s")
_XATTR_PREFIXES = (  # (name prefix, EROFS name index); a whole name for the ACLs
    ("user.", 1),
    ("trusted.", 4),
    ("security.", 6),
)
_ACLS = {"system.posix_acl_access": 2, "system.posix_acl_default": 3}
_FILE_TYPES = {
    stat.S_IFREG: 1,
    stat.S_IFDIR: 2,
    stat.S_IFCHR: 3,
    stat.S_IFBLK: 4,
    stat.S_IFIFO: 5,
    stat.S_IFSOCK: 6,
    stat.S_IFLNK: 7,
}


class ErofsUnsupported(Exception):
    """The view cannot be written as an EROFS image (a name or value EROFS cannot hold)."""


def _blocks(size: int) -> int:
    return (size + BLOCK - 1) >> BLOCK_BITS


class BlobLayout:
    """Where each regular file's bytes lie in the view's blob: files in inode order, each from a
    block of its own; empty files take no block."""

    def __init__(self, view: View) -> None:
        self.view = view
        self.starts: list[int] = []  # first byte of each laid-out file, ascending
        self.files: list[Node] = []
        block = 0
        for node in view.nodes[1:]:
            if node is None or not stat.S_ISREG(node.mode) or node.size == 0:
                continue
            self.starts.append(block << BLOCK_BITS)
            self.files.append(node)
            block += _blocks(node.size)
        self.size = block << BLOCK_BITS
        self._block_of = {node.ino: start >> BLOCK_BITS for node, start in zip(self.files, self.starts, strict=True)}

    def block_of(self, node: Node) -> int:
        """The blob block where the file's bytes start."""
        return self._block_of[node.ino]

    def files_in(self, offset: int, length: int) -> Iterator[tuple[int, Node | None, int, int]]:
        """The pieces of blob bytes [offset, offset+length): (blob offset, file or None for padding,
        offset in the file, length)."""
        end = min(offset + length, self.size)
        i = bisect.bisect_right(self.starts, offset) - 1
        position = offset
        while position < end:
            if i >= 0:
                node, start = self.files[i], self.starts[i]
                if position < start + node.size:
                    stop = min(end, start + node.size)
                    yield position, node, position - start, stop - position
                    position = stop
                    continue
            following = self.starts[i + 1] if i + 1 < len(self.starts) else self.size
            stop = min(end, following)
            if stop > position:
                yield position, None, 0, stop - position
                position = stop
            i += 1


def _xattr_body(node: Node) -> bytes:
    """The inline xattrs of an inode: the ibody header and its entries (b"" without xattrs)."""
    if not node.xattrs:
        return b""
    entries = []
    for name, value in sorted(node.xattrs.items()):
        index = _ACLS.get(name)
        suffix = b""
        if index is None:
            for prefix, number in _XATTR_PREFIXES:
                if name.startswith(prefix):
                    index, suffix = number, name[len(prefix) :].encode("utf-8", "surrogateescape")
                    break
            else:
                raise ErofsUnsupported(f"xattr {name!r} has a namespace EROFS cannot store")
        if len(suffix) > 255 or len(value) > 0xFFFF:
            raise ErofsUnsupported(f"xattr {name!r} is too long for EROFS")
        entry = _XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
        entries.append(entry + bytes(-len(entry) % 4))
    return _XATTR_HEADER.pack(0, 0, bytes(7)) + b"".join(entries)


def _dirent_groups(node: Node, parent: Node) -> list[list[tuple[bytes, Node]]]:
    """A directory's entries sorted by name ("." and ".." included), in groups that fill one
    block each: every block holds its dirents first, then their names."""
    assert node.children is not None
    entries = sorted([(b".", node), (b"..", parent), *node.children.items()], key=lambda item: item[0])
    groups: list[list[tuple[bytes, Node]]] = [[]]
    used = 0
    for name, child in entries:
        if not name or len(name) > 255:
            raise ErofsUnsupported(f"a name of {len(name)} bytes cannot be stored")
        if used + _DIRENT.size + len(name) > BLOCK:
            groups.append([])
            used = 0
        groups[-1].append((name, child))
        used += _DIRENT.size + len(name)
    return groups


def _dirent_block(entries: list[tuple[bytes, Node]], nid: dict[int, int], pad: bool) -> bytes:
    """One block of dirents; padded with zeros (which end its last name) unless it is a tail."""
    nameoff = _DIRENT.size * len(entries)
    heads, names = [], []
    for name, child in entries:
        heads.append(_DIRENT.pack(nid[child.ino], nameoff, _FILE_TYPES.get(stat.S_IFMT(child.mode), 0), 0))
        names.append(name)
        nameoff += len(name)
    block = b"".join(heads) + b"".join(names)
    return block + bytes(BLOCK - len(block)) if pad else block


def _parents(view: View) -> dict[int, Node]:
    parents = {view.root.ino: view.root}
    for node in view.nodes[1:]:
        if node is not None and node.children:
            for child in node.children.values():
                if child.children is not None:
                    parents[child.ino] = node
    return parents


def build_image(view: View, layout: BlobLayout) -> bytes:
    """The EROFS metadata image of `view`, its files' bytes on device 1 laid out by `layout`.
    ErofsUnsupported for what EROFS cannot hold (the view is then served by FUSE)."""
    if layout.size >> BLOCK_BITS > 0xFFFFFFFF:
        raise ErofsUnsupported(f"the view's files ({layout.size} bytes laid out) exceed the 16 TiB an EROFS device addresses")
    try:
        return _build_image(view, layout)
    except struct.error as e:  # a value wider than its on-disk field (e.g. a device number from a foreign index)
        raise ErofsUnsupported(f"a value does not fit EROFS's on-disk fields: {e}") from None


def _build_image(view: View, layout: BlobLayout) -> bytes:
    nodes = [n for n in view.nodes[1:] if n is not None]
    if nodes[0] is not view.root:
        raise ErofsUnsupported("the view's root must be its first inode")
    parents = _parents(view)
    # Pass 1: each inode's place in the metadata area (block 1 on), known from its own size; a
    # directory of one block and a symlink target go inline after their inode (never across a
    # block), larger ones into blocks of the data area after it.
    nid: dict[int, int] = {}
    xattrs: dict[int, bytes] = {}
    groups: dict[int, list[list[tuple[bytes, Node]]]] = {}
    inline: set[int] = set()
    position = INODE_SLOT  # nid 0 stays unused: the kernel's inode number is the nid, and readdir(3) skips 0
    for node in nodes:
        body = xattrs[node.ino] = _xattr_body(node)
        size = _INODE.size + len(body)
        tail = 0
        if node.children is not None:
            dirs = groups[node.ino] = _dirent_groups(node, parents.get(node.ino, node))
            if len(dirs) == 1:
                tail = sum(_DIRENT.size + len(name) for name, _ in dirs[0])
        elif stat.S_ISREG(node.mode) and node.size:
            size += -size % 8 + _CHUNK_INDEX.size
        elif stat.S_ISLNK(node.mode):
            if len(node.link) >= BLOCK:  # Linux's limit too (PATH_MAX with its NUL)
                raise ErofsUnsupported(f"a symlink target of {len(node.link)} bytes is too long")
            tail = len(node.link)
        if tail and size + tail <= BLOCK:
            inline.add(node.ino)
            size += tail
            if (position % BLOCK) + size > BLOCK:  # inline data must not cross a block
                position += -position % BLOCK
        nid[node.ino] = position // INODE_SLOT
        position += size + (-size % INODE_SLOT)
    meta_blocks = _blocks(position)
    first_data_block = 1 + meta_blocks
    # Pass 2: the data area (directories of several blocks, symlink targets too long to inline),
    # then every inode with what follows it.
    data = bytearray()
    meta = bytearray(meta_blocks * BLOCK)
    for node in nodes:
        body = xattrs[node.ino]
        kind = stat.S_IFMT(node.mode)
        size, u, tail = node.size, 0, b""
        layout_kind = LAYOUT_FLAT_INLINE if node.ino in inline else LAYOUT_FLAT_PLAIN
        if node.children is not None:
            if node.ino in inline:
                tail = _dirent_block(groups[node.ino][0], nid, pad=False)
                size = len(tail)
            else:
                u = first_data_block + len(data) // BLOCK
                start = len(data)
                for group in groups[node.ino]:
                    data += _dirent_block(group, nid, pad=True)
                size = len(data) - start
        elif kind == stat.S_IFREG and size:
            layout_kind = LAYOUT_CHUNK_BASED
            chunk_bits = max(0, (_blocks(size) - 1).bit_length())
            u = CHUNK_FORMAT_INDEXES | chunk_bits
            tail = bytes(-(_INODE.size + len(body)) % 8) + _CHUNK_INDEX.pack(0, 1, layout.block_of(node))
        elif kind == stat.S_IFLNK:
            size = len(node.link)
            if node.ino in inline:
                tail = node.link
            else:
                u = first_data_block + len(data) // BLOCK
                data += node.link + bytes(-len(node.link) % BLOCK)
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            u = node.rdev
        elif kind == stat.S_IFREG:
            size = 0
        seconds, nanos = divmod(node.mtime_ns, 1_000_000_000)
        inode = _INODE.pack(
            INODE_EXTENDED | (layout_kind << 1),
            (len(body) - _XATTR_HEADER.size) // 4 + 1 if body else 0,
            node.mode & 0xFFFF,
            0,
            size,
            u,
            node.ino & 0xFFFFFFFF,
            node.uid,
            node.gid,
            seconds,
            nanos,
            node.nlink,
            bytes(16),
        )
        at = nid[node.ino] * INODE_SLOT
        record = inode + body + tail
        meta[at : at + len(record)] = record
    total_blocks = first_data_block + len(data) // BLOCK
    if nid[view.root.ino] > 0xFFFF:
        raise ErofsUnsupported("the root inode lies beyond what the superblock can address")
    superblock = _SUPER.pack(
        MAGIC,
        0,  # checksum (no COMPAT_SB_CHKSUM)
        0,  # feature_compat
        BLOCK_BITS,
        0,  # sb_extslots
        nid[view.root.ino],
        len(nodes),
        0,
        0,
        total_blocks,
        1,  # meta_blkaddr
        0,  # xattr_blkaddr (no shared xattrs)
        bytes(16),
        b"liftoff"[:16],
        FEATURE_INCOMPAT_CHUNKED_FILE | FEATURE_INCOMPAT_DEVICE_TABLE,
        0,
        1,  # extra_devices: the blob
        DEVICE_SLOT_OFFSET // DEVICE_SLOT,
        0,  # dirblkbits
        0,
        0,
        0,
        0,
        bytes(23),
    )
    head = bytearray(BLOCK)
    head[SUPER_OFFSET : SUPER_OFFSET + len(superblock)] = superblock
    device = _DEVICE.pack(bytes(64), layout.size >> BLOCK_BITS, 0, bytes(56))
    head[DEVICE_SLOT_OFFSET : DEVICE_SLOT_OFFSET + len(device)] = device
    return bytes(head) + bytes(meta) + bytes(data)


def write_image(view: View, layout: BlobLayout, path: Path) -> None:
    """Write the view's image to `path` (0600): a temp file beside it, then a rename."""
    image = build_image(view, layout)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # left by a crash
    write_private(tmp, image)
    os.rename(tmp, path)
