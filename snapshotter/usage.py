"""Disk usage of a directory tree, counted the way containerd counts it."""

from __future__ import annotations

import os
from pathlib import Path


def disk_usage(root: Path) -> tuple[int, int]:
    """(bytes, inodes) under `root`, itself included: allocated blocks x 512, each inode once (hard links)."""
    seen: set[tuple[int, int]] = set()
    size = 0
    stack = [os.fspath(root)]
    st = os.lstat(root)
    seen.add((st.st_dev, st.st_ino))
    size += st.st_blocks * 512
    while stack:
        directory = stack.pop()
        try:
            it = os.scandir(directory)
        except FileNotFoundError:  # removed while we walk (a running container's upper dir)
            continue
        with it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                inode = (st.st_dev, st.st_ino)
                if inode not in seen:
                    seen.add(inode)
                    size += st.st_blocks * 512
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return size, len(seen)
