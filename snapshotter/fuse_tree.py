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

from layerstore.errors import FormatError
from layerstore.pb.liftoff.index.v1 import index_pb2 as pb

OPAQUE_XATTR = "trusted.overlay.opaque"
_new_node = object.__new__
_MAX_NS = 1 << 63
_REGULAR, _DIRECTORY, _SYMLINK = pb.ENTRY_TYPE_REGULAR, pb.ENTRY_TYPE_DIRECTORY, pb.ENTRY_TYPE_SYMLINK
_HARDLINK, _WHITEOUT, _OPAQUE = pb.ENTRY_TYPE_HARDLINK, pb.ENTRY_TYPE_WHITEOUT, pb.ENTRY_TYPE_OPAQUE
_CHAR_DEVICE = pb.ENTRY_TYPE_CHAR_DEVICE
_DEVICES = (_CHAR_DEVICE, pb.ENTRY_TYPE_BLOCK_DEVICE)
_S_IFMT = {
    pb.ENTRY_TYPE_REGULAR: stat.S_IFREG,
    pb.ENTRY_TYPE_DIRECTORY: stat.S_IFDIR,
    pb.ENTRY_TYPE_SYMLINK: stat.S_IFLNK,
    pb.ENTRY_TYPE_CHAR_DEVICE: stat.S_IFCHR,
    pb.ENTRY_TYPE_BLOCK_DEVICE: stat.S_IFBLK,
    pb.ENTRY_TYPE_FIFO: stat.S_IFIFO,
}


class Node:
    """One inode of the view (_file sets every slot too: keep the two in step)."""

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
        "spans",
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
        self.spans: list[tuple[pb.Chunk, int, int]] | None = None  # each extent's (chunk, offset in it, length), too

    @property
    def is_dir(self) -> bool:
        return self.children is not None


def _mtime(mtime_ns: int) -> int:
    """The mtime the applier sets: times before the epoch (or past 2262) become the epoch."""
    return mtime_ns if 0 <= mtime_ns < 1 << 63 else 0


def _xattrs(entry: pb.Entry, kind: int) -> dict[str, bytes]:
    """The xattrs the applier manages to set on a file of type `kind` (S_IF*): never trusted.*
    (refused), user.* only on regular files and directories (the kernel refuses the rest)."""
    out: dict[str, bytes] = {}
    if not entry.xattrs:
        return out
    for name, value in entry.xattrs.items():
        if name.startswith("trusted.") or (name.startswith("user.") and kind not in (stat.S_IFREG, stat.S_IFDIR)):
            continue
        out[name] = value
    return out


def _is_whiteout(node: Node) -> bool:
    """An overlayfs whiteout: a 0/0 character device (from a .wh. entry, or such a device in a tar)."""
    return stat.S_ISCHR(node.mode) and node.rdev == 0


def _relink(target: Node, entry: pb.Entry) -> None:
    """A hardlink entry's own header applied to the inode it shares, as the applier does: chown
    (which drops a file capability), its xattrs, chmod (not on a symlink) and mtime."""
    target.uid, target.gid = entry.uid, entry.gid
    target.xattrs.pop("security.capability", None)
    target.xattrs.update(_xattrs(entry, stat.S_IFMT(target.mode)))
    if not stat.S_ISLNK(target.mode):
        target.mode = stat.S_IFMT(target.mode) | entry.mode
    target.mtime_ns = _mtime(entry.mtime_ns)


def _count_links(upper: Node) -> None:
    """Each file's link count: the names it has in its own layer once the layer is applied."""
    counts: dict[int, int] = {}
    files: list[Node] = []
    stack = [upper]
    while stack:
        for child in stack.pop().children.values():  # type: ignore[union-attr]
            if child.is_dir:
                stack.append(child)
            elif not _is_whiteout(child):
                if id(child) not in counts:
                    files.append(child)
                counts[id(child)] = counts.get(id(child), 0) + 1
    for node in files:
        node.nlink = counts[id(node)]


def _file(entry: pb.Entry, path: bytes, layer: int) -> Node:
    """A regular file's node: _node's most common case, each slot set once (a start builds ~100,000)."""
    node = _new_node(Node)
    node.ino, node.rdev, node.nlink, node.link, node.children = 0, 0, 1, b"", None
    node.mode, node.uid, node.gid, node.size = stat.S_IFREG | entry.mode, entry.uid, entry.gid, entry.size
    mtime_ns = entry.mtime_ns
    node.mtime_ns = mtime_ns if 0 <= mtime_ns < _MAX_NS else 0
    node.xattrs = _xattrs(entry, stat.S_IFREG) if entry.xattrs else {}
    node.layer, node.extents, node.origin, node.starts, node.spans = layer, entry.extents, path, None, None
    return node


def _node(entry: pb.Entry, layer: int) -> Node:
    etype = entry.type
    kind = _S_IFMT[etype]
    mtime_ns = entry.mtime_ns
    node = Node(kind | entry.mode, entry.uid, entry.gid, mtime_ns if 0 <= mtime_ns < _MAX_NS else 0)
    xattrs = entry.xattrs
    if xattrs:
        node.xattrs = _xattrs(entry, kind)
    if etype == _REGULAR:
        node.size = entry.size
        node.layer = layer
        node.extents = entry.extents
        node.origin = entry.path
    elif etype == _SYMLINK:
        node.mode = stat.S_IFLNK | 0o777  # Linux ignores a symlink's mode: lstat always says 0777
        node.link = entry.link_target
        node.size = len(node.link)
    elif etype in _DEVICES:
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

    def _apply(self, number: int, index: pb.LayerIndex) -> None:
        """Apply one layer as containerd's applier unpacks it into a snapshot of its own, then merge
        that snapshot over the tree below as overlayfs shows it."""
        upper = _implicit_dir()
        opaque: set[int] = set()  # ids of this layer's directories marked opaque
        dir_times: list[tuple[bytes, int]] = []
        linked = False
        plain = True  # no whiteouts, opaque markers or character devices (which may be whiteouts)
        dirs: dict[bytes, Node] = {b"": upper}  # this layer's directories by path, while none is replaced
        replaced = False  # a directory was replaced: `dirs` was emptied, paths are walked again
        make_dirs = self._make_dirs
        for entry in index.entries:
            etype, path = entry.type, entry.path
            if etype == _OPAQUE:
                plain = False
                directory = make_dirs(upper, path)
                if directory is not None:
                    opaque.add(id(directory))
                continue
            if not path:  # the layer's root directory: its metadata only
                if etype == _DIRECTORY:
                    self._update_dir(self.root, entry, merge=False)
                continue
            parent_path, _, name = path.rpartition(b"/")
            parent = dirs.get(parent_path)
            if parent is None:
                parent = make_dirs(upper, parent_path)
                if parent is None:
                    continue  # beneath a file of the same layer: containerd's applier fails on it too
                dirs[parent_path] = parent
            children = parent.children
            assert children is not None
            existing = children.get(name)
            if etype == _DIRECTORY and existing is not None and existing.children is not None:
                dir_times.append((path, _mtime(entry.mtime_ns)))
                self._update_dir(existing, entry, merge=True)  # listed again in this layer: xattrs add up
                dirs[path] = existing
                continue
            if existing is not None and existing.children is not None:  # what was remembered beneath it is gone
                dirs.clear()
                dirs[b""] = upper
                replaced = True
            if etype == _WHITEOUT:
                plain = False
                children[name] = Node(stat.S_IFCHR)  # overlayfs's whiteout, as the applier makes it
            elif etype == _HARDLINK:
                target = self._walk_in(upper, entry.link_target)
                if target is None or target.is_dir:
                    continue  # the converter refuses such layers; be safe with foreign indexes
                _relink(target, entry)
                children[name] = target
                linked = True
            elif etype == _REGULAR:
                children[name] = _file(entry, path, number)
            else:
                node = children[name] = _node(entry, number)
                if etype == _DIRECTORY:
                    dir_times.append((path, _mtime(entry.mtime_ns)))
                    dirs[path] = node
                elif etype == _CHAR_DEVICE:
                    plain = False
        for path, mtime_ns in dir_times:  # set last, as the applier does, on whatever the path now is
            node = self._walk_in(upper, path) if replaced else dirs.get(path)
            if node is not None and not stat.S_ISLNK(node.mode):
                node.mtime_ns = mtime_ns
        if linked:
            _count_links(upper)
        self._merge(self.root, upper, b"", opaque, plain)

    def _make_dirs(self, upper: Node, path: bytes) -> Node | None:
        """The directory at `path` in a layer's own tree, made as the applier makes missing parents:
        with the metadata of the directory below, if there is one (0755 root-owned otherwise)."""
        node = upper
        below: Node | None = self.root
        for part in path.split(b"/") if path else ():
            below = below.children.get(part) if below is not None and below.children is not None else None
            if node.children is None:
                return None
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = _implicit_dir()
                if below is not None and below.is_dir:
                    child.mode, child.uid, child.gid, child.mtime_ns = below.mode, below.uid, below.gid, below.mtime_ns
                    child.xattrs = {k: v for k, v in below.xattrs.items() if not k.startswith("trusted.")}
            node = child
        return node if node.is_dir else None

    @staticmethod
    def _walk_in(node: Node, path: bytes) -> Node | None:
        for part in path.split(b"/") if path else ():
            if node.children is None or (child := node.children.get(part)) is None:
                return None
            node = child
        return node

    def _merge(self, lower: Node, upper: Node, prefix: bytes, opaque: set[int], plain: bool) -> None:
        """Lay a layer's directory over the merged one below, as overlayfs does. A `plain` layer (no
        whiteouts or opaque markers) over no layers below the run adds its new directories whole."""
        assert lower.children is not None and upper.children is not None
        if id(upper) in opaque:
            lower.children.clear()
            if self.layers_below:
                lower.xattrs[OPAQUE_XATTR] = b"y"
        children = lower.children
        hidden = self._hidden if self.layers_below else None  # (always empty without layers below)
        for name, node in upper.children.items():
            if node.children is None:  # a whiteout or a file
                if node.rdev == 0 and stat.S_ISCHR(node.mode):  # an overlayfs whiteout
                    children.pop(name, None)
                    if hidden is not None:
                        hidden.add(prefix + name)
                else:
                    if hidden:
                        hidden.discard(prefix + name)
                    children[name] = node
                continue
            path = prefix + name
            below = children.get(name)
            if below is not None and below.children is not None:
                self._copy_dir(below, node)  # a directory over a directory: merged, the upper's metadata
                self._merge(below, node, path + b"/", opaque, plain)
            elif plain and hidden is None:  # nothing in it to take away, nothing below to hide: as it is
                children[name] = node
            else:  # a directory where there was none, or over a file: its own children only
                carrier = _implicit_dir()
                carrier.children, node.children = node.children, {}
                if id(node) in opaque:
                    opaque.add(id(carrier))
                if hidden is not None and (below is not None or path in hidden):
                    node.xattrs[OPAQUE_XATTR] = b"y"  # what lay here below the run stays hidden
                if hidden:
                    hidden.discard(path)
                children[name] = node
                self._merge(node, carrier, path + b"/", opaque, plain)

    @staticmethod
    def _update_dir(node: Node, entry: pb.Entry, merge: bool) -> None:
        """A directory entry over a directory of the same layer: the applier chowns, chmods and sets
        xattrs on it (adding to those it has)."""
        node.mode = stat.S_IFDIR | entry.mode
        node.uid, node.gid, node.mtime_ns = entry.uid, entry.gid, _mtime(entry.mtime_ns)
        xattrs = _xattrs(entry, stat.S_IFDIR)
        if merge:
            node.xattrs.update(xattrs)
        else:
            opaque = node.xattrs.get(OPAQUE_XATTR)
            node.xattrs = xattrs
            if opaque:
                node.xattrs[OPAQUE_XATTR] = opaque

    @staticmethod
    def _copy_dir(below: Node, upper: Node) -> None:
        """A layer's directory over one below: overlayfs shows the upper one's metadata."""
        opaque = below.xattrs.get(OPAQUE_XATTR)
        below.mode, below.uid, below.gid, below.mtime_ns = upper.mode, upper.uid, upper.gid, upper.mtime_ns
        below.xattrs = dict(upper.xattrs)
        if opaque:
            below.xattrs[OPAQUE_XATTR] = opaque

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
        nodes = self.nodes
        while stack:
            node = stack.pop()
            if node.ino:
                continue  # a hardlinked node is numbered once
            node.ino = len(nodes)
            nodes.append(node)
            children = node.children
            if children is not None:
                node.nlink = 2 + sum(1 for child in children.values() if child.children is not None)
                stack.extend(reversed(children.values()))

    # -- lookups -------------------------------------------------------------------------

    def node(self, ino: int) -> Node | None:
        """The node with inode number `ino`."""
        return self.nodes[ino] if 0 < ino < len(self.nodes) else None

    def resolve(self, path: bytes) -> Node | None:
        """The node at a '/'-separated path relative to the root ("" or "/" is the root)."""
        return self._walk(path.strip(b"/"), create=False)

    def spans(self, node: Node) -> list[tuple[pb.Chunk, int, int]]:
        """A regular file's (chunk, offset in it, length) per extent, checked against its chunks once
        per file (the daemon loads indexes without the full check: a start reads few of its files);
        FormatError if an extent lies outside its chunk."""
        spans = node.spans
        if spans is None:  # read from the index once per file: its messages are slow to walk
            index = self.layers[node.layer]
            chunks = index.chunks
            starts, spans, position = [], [], 0
            for extent in node.extents:
                number, at, size = extent.chunk, extent.offset, extent.length
                if number >= len(chunks) or at + size > chunks[number].size:
                    raise FormatError(
                        f"the index of layer {index.layer_digest or '?'} is corrupt: file {node.origin!r} points outside "
                        "its chunks; pull the image again (re-run liftoff convert if the store's index is bad too)"
                    )
                starts.append(position)
                spans.append((chunks[number], at, size))
                position += size
            node.starts, node.spans = starts, spans
        return spans

    def extents_for(self, node: Node, offset: int, length: int) -> list[tuple[pb.Chunk, int, int]]:
        """The (chunk, offset in chunk, length) pieces that hold bytes [offset, offset+length) of a file;
        FormatError if the file's extents are corrupt (spans)."""
        spans = self.spans(node)
        end = min(offset + length, node.size)
        if offset >= end:
            return []
        if len(spans) == 1:  # most files: one extent
            chunk, at, size = spans[0]
            return [(chunk, at + offset, min(end, size) - offset)] if offset < size else []
        starts = node.starts
        assert starts is not None
        i = max(0, bisect.bisect_right(starts, offset) - 1)
        pieces = []
        while i < len(spans) and starts[i] < end:
            chunk, at, size = spans[i]
            start = max(offset, starts[i])
            stop = min(end, starts[i] + size)
            if stop > start:
                pieces.append((chunk, at + start - starts[i], stop - start))
            i += 1
        return pieces
