"""The merged, read-only tree of a run of remote layers, built in memory from their indexes.

Layers are applied bottom to top with OCI semantics: a layer's whiteouts and opaque
markers act on the layers below it (never on its own entries), then its entries are
added; a later entry for the same path replaces the earlier one (a directory over a
directory keeps its children). Hardlinks share one node (one inode number).

When other layers lie below the run (it is not the bottom of the chain), what the run
deletes from them must stay visible to overlayfs: a path whited out and not re-created
becomes an overlay whiteout (a 0/0 character device), and a directory that hides what
lies below it carries `trusted.overlay.opaque=y`.
"""

from __future__ import annotations

import bisect
import stat
from collections.abc import Sequence

from layerstore.pb.liftoff.index.v1 import index_pb2 as pb

OPAQUE_XATTR = "trusted.overlay.opaque"
_S_IFMT = {
    pb.ENTRY_TYPE_REGULAR: stat.S_IFREG,
    pb.ENTRY_TYPE_DIRECTORY: stat.S_IFDIR,
    pb.ENTRY_TYPE_SYMLINK: stat.S_IFLNK,
    pb.ENTRY_TYPE_CHAR_DEVICE: stat.S_IFCHR,
    pb.ENTRY_TYPE_BLOCK_DEVICE: stat.S_IFBLK,
    pb.ENTRY_TYPE_FIFO: stat.S_IFIFO,
}


class Node:
    """One inode of the view."""

    __slots__ = (
        "children",
        "extents",
        "gid",
        "ino",
        "layer",
        "link",
        "mode",
        "mtime_ns",
        "nlink",
        "origin",
        "rdev",
        "size",
        "starts",
        "uid",
        "xattrs",
    )

    def __init__(self, mode: int, uid: int = 0, gid: int = 0, mtime_ns: int = 0) -> None:
        self.ino = 0
        self.mode = mode  # st_mode: type and permission bits
        self.uid = uid
        self.gid = gid
        self.size = 0
        self.mtime_ns = mtime_ns
        self.rdev = 0
        self.nlink = 1
        self.link = b""  # symlink target
        self.xattrs: dict[str, bytes] = {}
        self.children: dict[bytes, Node] | None = {} if stat.S_ISDIR(mode) else None
        self.layer = -1  # which layer's chunk table the extents index
        self.extents: Sequence[pb.Extent] = ()
        self.origin = b""  # path of the layer entry that owns the extents (hardlinks share it)
        self.starts: list[int] | None = None  # file offset of each extent, built on first read

    @property
    def is_dir(self) -> bool:
        return self.children is not None


def _node(entry: pb.Entry, layer: int) -> Node:
    node = Node(_S_IFMT[entry.type] | entry.mode, entry.uid, entry.gid, entry.mtime_ns)
    node.xattrs = dict(entry.xattrs)
    if entry.type == pb.ENTRY_TYPE_REGULAR:
        node.size = entry.size
        node.layer = layer
        node.extents = entry.extents
        node.origin = entry.path
    elif entry.type == pb.ENTRY_TYPE_SYMLINK:
        node.mode = stat.S_IFLNK | 0o777  # Linux ignores a symlink's mode: lstat always says 0777
        node.link = entry.link_target
        node.size = len(entry.link_target)
    elif entry.type in (pb.ENTRY_TYPE_CHAR_DEVICE, pb.ENTRY_TYPE_BLOCK_DEVICE):
        node.rdev = (entry.dev_major << 8) | (entry.dev_minor & 0xFF) | ((entry.dev_minor & ~0xFF) << 12)
    return node


def _implicit_dir() -> Node:
    """A directory a layer needs but does not list (its parent in no tar of the run)."""
    return Node(stat.S_IFDIR | 0o755)


class View:
    """The merged tree: nodes by inode number (1 is the root), and the layers' chunk tables."""

    def __init__(self, layers: Sequence[pb.LayerIndex], layers_below: bool = False) -> None:
        self.layers = list(layers)
        self.layers_below = layers_below
        self.root = _implicit_dir()
        self._hidden: set[bytes] = set()  # paths whose content below the run is hidden
        for number, index in enumerate(self.layers):
            self._apply(number, index)
        if layers_below:
            self._add_overlay_whiteouts()
        self.nodes: list[Node | None] = [None]
        self._number(self.root)

    # -- building ------------------------------------------------------------------------

    def _walk(self, path: bytes, create: bool) -> Node | None:
        """The node at `path`; with `create`, missing parents are made as implicit directories."""
        node = self.root
        if not path:
            return node
        for part in path.split(b"/"):
            if node.children is None:
                return None
            child = node.children.get(part)
            if child is None:
                if not create:
                    return None
                child = node.children[part] = _implicit_dir()
            node = child
        return node

    def _parent(self, path: bytes) -> tuple[Node | None, bytes]:
        parent_path, _, name = path.rpartition(b"/")
        return self._walk(parent_path, create=True), name

    def _apply(self, number: int, index: pb.LayerIndex) -> None:
        opaque: list[bytes] = []
        for entry in index.entries:  # whiteouts act on the layers below this one
            if entry.type == pb.ENTRY_TYPE_WHITEOUT:
                parent = self._walk(entry.path.rpartition(b"/")[0], create=False)
                if parent is not None and parent.children is not None:
                    parent.children.pop(entry.path.rpartition(b"/")[2], None)
                self._hide(entry.path)
            elif entry.type == pb.ENTRY_TYPE_OPAQUE:
                directory = self._walk(entry.path, create=False)
                if directory is not None and directory.children is not None:
                    directory.children.clear()
                opaque.append(entry.path)
        links: dict[int, int] = {}
        for entry in index.entries:
            if entry.type in (pb.ENTRY_TYPE_WHITEOUT, pb.ENTRY_TYPE_OPAQUE):
                continue
            if entry.type == pb.ENTRY_TYPE_HARDLINK:
                target = self._walk(entry.link_target, create=False)
                if target is None or target.is_dir:
                    continue  # the converter refuses such layers; be safe with foreign indexes
                self._place(entry.path, target)
                links[id(target)] = links.get(id(target), 1) + 1
                target.nlink = links[id(target)]
                continue
            if not entry.path:  # the layer's root directory: its metadata only
                self._update_dir(self.root, entry)
                continue
            parent, name = self._parent(entry.path)
            if parent is None or parent.children is None:
                continue  # beneath a non-directory: the converter refuses it
            existing = parent.children.get(name)
            if entry.type == pb.ENTRY_TYPE_DIRECTORY and existing is not None and existing.is_dir:
                self._update_dir(existing, entry)
                continue
            node = _node(entry, number)
            if node.is_dir and self.layers_below and (existing is not None or entry.path in self._hidden):
                node.xattrs[OPAQUE_XATTR] = b"y"  # what lay here below the run stays hidden
            self._hidden.discard(entry.path)
            parent.children[name] = node
        for path in opaque:
            directory = self._walk(path, create=True)
            if directory is not None and directory.is_dir and self.layers_below:
                directory.xattrs[OPAQUE_XATTR] = b"y"

    def _place(self, path: bytes, node: Node) -> None:
        parent, name = self._parent(path)
        if parent is not None and parent.children is not None:
            parent.children[name] = node
            self._hidden.discard(path)

    @staticmethod
    def _update_dir(node: Node, entry: pb.Entry) -> None:
        opaque = node.xattrs.get(OPAQUE_XATTR)
        node.mode = stat.S_IFDIR | entry.mode
        node.uid, node.gid, node.mtime_ns = entry.uid, entry.gid, entry.mtime_ns
        node.xattrs = dict(entry.xattrs)
        if opaque:
            node.xattrs[OPAQUE_XATTR] = opaque

    def _hide(self, path: bytes) -> None:
        if self.layers_below:
            self._hidden.add(path)

    def _add_overlay_whiteouts(self) -> None:
        for path in sorted(self._hidden):
            if self._walk(path, create=False) is not None:
                continue
            parent_path, _, name = path.rpartition(b"/")
            parent = self._walk(parent_path, create=False)
            if parent is None:
                # the parent comes only from below the run: overlay merges this directory with it
                parent = self._walk(parent_path, create=True)
            if parent is not None and parent.children is not None and OPAQUE_XATTR not in parent.xattrs:
                parent.children[name] = Node(stat.S_IFCHR)  # rdev 0/0: overlayfs's whiteout

    def _number(self, root: Node) -> None:
        stack = [root]
        seen: set[int] = set()
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue  # a hardlinked node is numbered once
            seen.add(id(node))
            node.ino = len(self.nodes)
            self.nodes.append(node)
            if node.children is not None:
                node.nlink = 2 + sum(1 for child in node.children.values() if child.is_dir)
                stack.extend(reversed(list(node.children.values())))

    # -- lookups -------------------------------------------------------------------------

    def node(self, ino: int) -> Node | None:
        """The node with inode number `ino`."""
        return self.nodes[ino] if 0 < ino < len(self.nodes) else None

    def resolve(self, path: bytes) -> Node | None:
        """The node at a '/'-separated path relative to the root ("" or "/" is the root)."""
        return self._walk(path.strip(b"/"), create=False)

    def extents_for(self, node: Node, offset: int, length: int) -> list[tuple[pb.Chunk, int, int]]:
        """The (chunk, offset in chunk, length) pieces that hold bytes [offset, offset+length) of a file."""
        if node.starts is None:
            starts, position = [], 0
            for extent in node.extents:
                starts.append(position)
                position += extent.length
            node.starts = starts
        end = min(offset + length, node.size)
        if offset >= end:
            return []
        i = max(0, bisect.bisect_right(node.starts, offset) - 1)
        chunks = self.layers[node.layer].chunks
        pieces = []
        while i < len(node.extents) and node.starts[i] < end:
            extent = node.extents[i]
            start = max(offset, node.starts[i])
            stop = min(end, node.starts[i] + extent.length)
            if stop > start:
                pieces.append((chunks[extent.chunk], extent.offset + start - node.starts[i], stop - start))
            i += 1
        return pieces
