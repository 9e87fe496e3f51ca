"""The mounts containerd gets for a snapshot, as containerd's overlayfs snapshotter builds them.

- no parent: a bind mount of the snapshot's own `fs` (rw for active, ro for a view);
- a view on exactly one committed layer: a read-only bind mount of that layer;
- an active snapshot with parents: overlay with upperdir/workdir over the parents' lower dirs;
- a view on several layers: a read-only overlay of the lower dirs alone.

`index=off` is added when the kernel's overlay module has the `index` feature (reusing a lower
layer under many overlays must not trip its inode index) and `userxattr` only when running in
a user namespace, where overlay must keep its attributes in user.* xattrs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from snapshotter.metadata import Kind, Snapshot


@dataclass(frozen=True)
class Mount:
    """One mount(2): type, source and fstab-style options."""

    type: str
    source: str
    options: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class OverlayFeatures:
    """Overlay options this host needs."""

    index_off: bool = False
    userxattr: bool = False

    def options(self) -> list[str]:
        return (["index=off"] if self.index_off else []) + (["userxattr"] if self.userxattr else [])


def detect_overlay_features() -> OverlayFeatures:
    """What this kernel and process need: index=off where overlay has an index, userxattr in a user namespace."""
    index_off = os.path.exists("/sys/module/overlay/parameters/index")
    return OverlayFeatures(index_off=index_off, userxattr=_in_user_namespace())


def _in_user_namespace() -> bool:
    try:
        fields = Path("/proc/self/uid_map").read_text().split()
    except OSError:
        return False
    return fields[:3] != ["0", "0", "4294967295"]


def build_mounts(
    snapshot: Snapshot,
    parents: Sequence[Snapshot],
    upper_dir: Path,
    work_dir: Path,
    lower_dirs: Callable[[Sequence[Snapshot]], list[Path]],
    features: OverlayFeatures,
) -> list[Mount]:
    """The mounts of an active snapshot or view; `parents` nearest first.

    `lower_dirs(parents)` names the overlay lower directories, nearest first: one per
    parent for local layers, one for each run of remote layers (a merged FUSE view).
    """
    if not parents:
        mode = "rw" if snapshot.kind == Kind.ACTIVE else "ro"
        return [Mount("bind", str(upper_dir), (mode, "rbind"))]
    lowers = lower_dirs(parents)
    if snapshot.kind != Kind.ACTIVE and len(lowers) == 1:
        return [Mount("bind", str(lowers[0]), ("ro", "rbind"))]
    options = features.options()
    if snapshot.kind == Kind.ACTIVE:
        options += [f"workdir={work_dir}", f"upperdir={upper_dir}"]
    options.append("lowerdir=" + ":".join(str(path) for path in lowers))
    return [Mount("overlay", "overlay", tuple(options))]
