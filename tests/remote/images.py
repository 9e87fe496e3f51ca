"""Images for the lazy-layer tests: every kind of entry and every way layers interact."""

from __future__ import annotations

import random

from layerstore.oci.builder import Member, make_tar
from tests.converter.images import CAPABILITY, NON_UTF8
from tests.snapshotter.helpers import APPLETS, BUSYBOX

DEEP = "/".join(f"level{i}-{'n' * 30}" for i in range(6))
IMPLICIT_DIRS = ["/".join(DEEP.split("/")[:i]) for i in range(1, 6)]  # parents that no tar lists


def conformance_layers() -> list[bytes]:
    """Three layers: a busybox base with odd entries, then changes (whiteouts, opaque dirs,
    hardlinks within and across layers, replaced files), then a small app layer."""
    rng = random.Random(11)
    busybox = BUSYBOX.read_bytes()
    deep = DEEP
    base = make_tar(
        [
            Member("bin", "dir"),
            Member("bin/busybox", data=busybox, mode=0o755),
            *[Member(f"bin/{a}", "symlink", linkname="busybox") for a in APPLETS],
            Member("bin/su-like", data=b"#!/bin/sh\nid\n", mode=0o4755),
            Member("bin/sgid", data=b"#!/bin/sh\n", mode=0o2711, gid=50),
            Member("bin/caps", data=b"caps\n", mode=0o755, xattrs={"security.capability": CAPABILITY}),
            Member("etc", "dir"),
            Member("etc/os-release", data=b"NAME=liftoff-test\n"),
            Member("etc/shadow", data=b"root:*:1::::::\n", mode=0o640, gid=42),
            Member("etc/removed", data=b"removed in layer 2\n"),
            Member("etc/app", "dir"),
            Member("etc/app/a.conf", data=b"a\n"),
            Member("etc/app/b.conf", data=b"b\n"),
            Member("lib", "dir"),
            Member("lib/big.so", data=rng.randbytes(3 << 20)),
            Member("lib/zeros", data=bytes(2 << 20)),
            Member("lib/empty", data=b""),
            Member("lib/libfoo.so.1", data=b"foo"),
            Member("lib/libfoo.so", "symlink", linkname="libfoo.so.1"),
            Member("lib/abs-link", "symlink", linkname="/etc/os-release"),
            Member("lib/up-link", "symlink", linkname="../../../etc/os-release"),
            Member("lib/hard-a", data=b"hard within layer 1\n"),
            Member("lib/hard-b", "hardlink", linkname="lib/hard-a"),
            Member("srv", "dir", mode=0o750, uid=1000, gid=1000),
            Member("srv/owned", data=b"owned\n", uid=1000, gid=1000, uname="app", gname="app"),
            Member("srv/tagged", data=b"tags\n", xattrs={"user.origin": b"liftoff", "trusted.liftoff": b"\x00\x01\xff"}),
            Member("srv/" + "long-" + "x" * 200, data=b"long name\n"),
            Member(deep, "dir"),
            Member(deep + "/deep-file", data=b"deep\n"),
            Member("srv/naïve-日本語.txt", data="unicode ✓\n".encode()),
            Member("srv/" + NON_UTF8, data=b"binary name\n"),
            Member("dev", "dir"),
            Member("dev/null-copy", "char", devmajor=1, devminor=3, mode=0o666),
            Member("dev/loop-copy", "block", devmajor=7, devminor=0, mode=0o660, gid=6),
            Member("dev/fifo", "fifo", mode=0o620),
            Member("tmp", "dir", mode=0o1777),
            Member("var", "dir"),
            Member("var/cache", "dir"),
            Member("var/cache/hidden-by-opaque", data=b"layer 1 cache\n"),
        ]
    )
    changes = make_tar(
        [
            Member("etc", "dir"),
            Member("etc/.wh.removed"),
            Member("etc/os-release", data=b"NAME=liftoff-test\nVERSION=2\n", mtime_ns=1_710_000_000_555_000_000),
            Member("etc/app/.wh..wh..opq"),
            Member("etc/app", "dir", mode=0o700),
            Member("etc/app/c.conf", data=b"c\n"),
            Member("var", "dir"),
            Member("var/cache", "dir"),
            Member("var/cache/.wh..wh..opq"),
            Member("var/cache/fresh", data=b"layer 2 cache\n"),
            Member("lib", "dir"),
            Member("lib/hard-a", data=b"replaced in layer 2: hard-b keeps layer 1's bytes\n"),
            Member("lib/cross-a", data=b"hard within layer 2\n"),
            Member("lib/cross-b", "hardlink", linkname="lib/cross-a"),
            Member("lib/zeros.2", data=bytes(1 << 20)),
            Member("srv", "dir", mode=0o750, uid=1000, gid=1000),
            Member("srv/.wh.tagged"),
            Member("srv/tagged", "dir", mode=0o711),
            Member("srv/tagged/now-a-dir", data=b"file became a directory\n"),
        ]
    )
    app = make_tar(
        [
            Member("app", "dir"),
            Member("app/run.sh", data=b"#!/bin/sh\necho lazily started\ncat /etc/os-release\n", mode=0o755),
            Member("app/model.bin", data=rng.randbytes(5 << 20)),
            Member("etc", "dir"),
            Member("etc/.wh.shadow"),
        ]
    )
    return [base, changes, app]
