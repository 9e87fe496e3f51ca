"""Root-only state on the node: image bytes (views, indexes, cached chunks) stay private.

Directories are 0700 and files 0600, as containerd keeps its own snapshotter state
(/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs is 0700). Files are created
with their mode (never made private after the fact, so no window where they are readable);
what an older liftoff left with looser modes is tightened at start.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from layerstore.errors import LiftoffError

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Make `path` a root-only directory: missing components are created 0700, an existing one
    open to group or others is made 0700; a shared directory (world-writable, sticky, or another
    user's) is refused, since liftoff would otherwise change or expose someone else's directory."""
    path = Path(path)
    missing = []
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=DIR_MODE)  # the umask only removes bits
        except FileExistsError:
            pass  # made meanwhile by the other liftoff process
    restrict_dir(path)
    return path


def restrict_dir(path: Path) -> None:
    """Tighten an existing directory of ours to 0700 (see private_dir)."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise LiftoffError(f"{path} is not a directory; liftoff keeps its state there: remove it or choose another --root")
    mode = stat.S_IMODE(st.st_mode)
    if not mode & 0o077:
        return
    if st.st_uid != os.geteuid() or mode & (stat.S_IWOTH | stat.S_ISVTX):
        raise LiftoffError(
            f"{path} is mode {mode:04o} owned by uid {st.st_uid}: liftoff keeps image bytes there, so it must be a "
            f"directory of its own that liftoff makes 0700; choose another --root (a new or empty directory)"
        )
    os.chmod(path, DIR_MODE)
    log.info("made %s private (mode 0700, was %04o)", path, mode)


def restrict_file(path: str | os.PathLike[str], mode: int | None = None) -> None:
    """Tighten a file an older liftoff left open to group or others to 0600 (`mode`: its st_mode if known)."""
    if mode is None:
        mode = os.lstat(path).st_mode
    if stat.S_ISREG(mode) and stat.S_IMODE(mode) & 0o077:
        os.chmod(path, FILE_MODE)


def create_private(path: str | os.PathLike[str]) -> int:
    """Create a new file (it must not exist) readable and writable by its owner alone; returns its descriptor."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)


def write_private(path: str | os.PathLike[str], data: bytes | memoryview) -> None:
    """Write a new file (mode 0600) with `data`; the caller renames it into place."""
    fd = create_private(path)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
