"""Startup profiles: the chunks a real start reads, in first-access order.

A `Recorder` sits in a view's read path and notes each chunk the first time a read
touches it (and which file, for humans). A profile is stored in the image record
(`records.ImageRecord.profile`):

    {"version": 1, "recorded_at": ISO time, "command": [...], "seconds": float,
     "chunks": [{"layer": digest, "sha256": hex, "size": bytes, "stored": bytes}, ...],
     "files": [path, ...], "starts": N}

`merge` folds traces of real starts (recorded by the FUSE daemon with --learn-seconds)
into a profile: chunks ordered by their mean first-access rank across traces.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime

from snapshotter.fuse_tree import Node, View

PROFILE_VERSION = 1


class Recorder:
    """Collects first accesses of chunks (and files) during a start."""

    def __init__(self, view: View, seconds: float | None = None) -> None:
        self.view = view
        self.started = time.monotonic()
        self.deadline = self.started + seconds if seconds else None
        self._lock = threading.Lock()
        self._chunks: dict[bytes, dict] = {}  # insertion order = first access
        self._files: dict[int, None] = {}
        self._ranges: dict[int, list[tuple[int, int]]] = {}  # ino -> byte ranges read, in order

    @property
    def active(self) -> bool:
        return self.deadline is None or time.monotonic() < self.deadline

    def on_read(self, node: Node, offset: int, size: int) -> None:
        """Called by the FUSE server for every read request."""
        if not self.active:
            return
        pieces = self.view.extents_for(node, offset, size)
        layer = self.view.layers[node.layer].layer_digest if node.layer >= 0 else ""
        with self._lock:
            self._files.setdefault(node.ino, None)
            self._ranges.setdefault(node.ino, []).append((offset, min(offset + size, node.size)))
            for chunk, _, _ in pieces:
                if chunk.sha256 not in self._chunks:
                    self._chunks[chunk.sha256] = {
                        "layer": layer,
                        "sha256": chunk.sha256.hex(),
                        "size": chunk.size,
                        "stored": chunk.stored_size,
                    }

    def trace(self) -> dict:
        """What was recorded so far."""
        paths = _paths(self.view, set(self._files))
        with self._lock:
            chunks = list(self._chunks.values())
            files = [paths.get(ino, "?") for ino in self._files]
            ranges = []
            for ino, spans in self._ranges.items():
                node = self.view.node(ino)
                if node is None or node.layer < 0:
                    continue
                ranges.append(
                    {
                        "layer": self.view.layers[node.layer].layer_digest,
                        "path": node.origin.hex(),
                        "ranges": merge_ranges(spans),
                    }
                )
        return {
            "version": PROFILE_VERSION,
            "recorded_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "seconds": round(time.monotonic() - self.started, 3),
            "chunks": chunks,
            "files": files,
            "ranges": ranges,  # per file (layer, hex path): the byte ranges read, for relayout
            "layers": [index.layer_digest for index in self.view.layers],
        }


def merge_ranges(spans: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Sorted, non-overlapping [start, end) ranges covering `spans`."""
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def _paths(view: View, wanted: set[int]) -> dict[int, str]:
    """Paths of the wanted inodes (one walk of the tree)."""
    found: dict[int, str] = {}
    stack = [(view.root, b"")]
    while stack and len(found) < len(wanted):
        node, path = stack.pop()
        if node.ino in wanted and node.ino not in found:
            found[node.ino] = "/" + path.decode("utf-8", "backslashreplace")
        if node.children:
            stack.extend((child, path + b"/" + name if path else name) for name, child in node.children.items())
    return found


def summarize(profile: dict) -> str:
    """One line about a profile."""
    stored = sum(c.get("stored", 0) for c in profile.get("chunks", []))
    return (
        f"{len(profile.get('chunks', []))} chunks ({stored / 1e6:.1f} MB stored), "
        f"{len(profile.get('files', []))} files, from {profile.get('starts', 1)} start(s)"
    )


def merge(profile: dict | None, traces: Iterable[dict]) -> dict:
    """Fold traces into a profile: every chunk any start read, ordered by mean first-access rank."""
    sources = ([profile] if profile else []) + list(traces)
    if not sources:
        raise ValueError("nothing to merge")
    ranks: dict[str, list[float]] = {}
    info: dict[str, dict] = {}
    files: dict[str, None] = {}
    starts = 0
    for source in sources:
        weight = source.get("starts", 1)
        starts += weight
        chunks = source.get("chunks", [])
        for rank, chunk in enumerate(chunks):
            ranks.setdefault(chunk["sha256"], []).extend([rank / max(1, len(chunks))] * weight)
            info.setdefault(chunk["sha256"], chunk)
        for path in source.get("files", []):
            files.setdefault(path, None)
    order = sorted(ranks, key=lambda h: (sum(ranks[h]) / len(ranks[h]), h))
    base = dict(sources[0])
    base.update(
        version=PROFILE_VERSION,
        chunks=[info[h] for h in order],
        files=list(files),
        starts=starts,
        recorded_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    return base
