"""The blob of an EROFS view, served by FUSE: one read-only file whose bytes are the view's
files laid out by `erofs_image.BlobLayout`; the padding between files reads as zeros.

`BlobView` stands where a `fuse_tree.View` stands for a `FuseSession`: a root directory
holding one file, `blob`, whose reads map onto the files' chunks.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator

from layerstore.pb.liftoff.index.v1 import index_pb2 as pb
from snapshotter.erofs_image import BlobLayout
from snapshotter.fuse_tree import Node, View

BLOB_NAME = b"blob"
Piece = tuple[pb.Chunk | None, int, int]  # (chunk, offset in it, length); no chunk: zeros


class BlobView:
    """A two-inode tree (1: the root, 2: the blob) over a view's files."""

    def __init__(self, view: View, layout: BlobLayout) -> None:
        self.view = view
        self.layout = layout
        self.layers = view.layers
        self.root = Node(stat.S_IFDIR | 0o500)
        self.blob = Node(stat.S_IFREG | 0o400)
        self.blob.size = layout.size
        self.root.children = {BLOB_NAME: self.blob}
        self.root.ino, self.blob.ino = 1, 2
        self.root.nlink = 2
        self.nodes: list[Node | None] = [None, self.root, self.blob]

    def node(self, ino: int) -> Node | None:
        return self.nodes[ino] if 0 < ino < len(self.nodes) else None

    def resolve(self, path: bytes) -> Node | None:
        path = path.strip(b"/")
        return self.root if not path else self.root.children.get(path)  # type: ignore[union-attr]

    def files_in(self, offset: int, length: int) -> Iterator[tuple[Node, int, int]]:
        """The files a blob read touches: (file, offset in it, length)."""
        for _at, node, start, size in self.layout.files_in(offset, length):
            if node is not None:
                yield node, start, size

    def extents_for(self, node: Node, offset: int, length: int) -> list[Piece]:
        """The pieces holding blob bytes [offset, offset+length): the files' chunks, and zeros."""
        if node is not self.blob:
            return []
        pieces: list[Piece] = []
        extents_for = self.view.extents_for
        for _at, file, start, size in self.layout.files_in(offset, length):
            if file is None:
                pieces.append((None, 0, size))
            else:
                pieces.extend(extents_for(file, start, size))
        return pieces
