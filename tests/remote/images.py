"""Images for the lazy-layer tests: every kind of entry and every way layers interact."""

from __future__ import annotations

import random

from liftoff.devstack.ocibuild import Member, make_tar
from tests.converter.images import CAPABILITY, NON_UTF8
from tests.snapshotter.helpers import APPLETS, BUSYBOX

DEEP = "/".join(f"level{i}-{'n' * 30}" for i in range(6))
T1 = 1_600_000_000_123_000_000
T2 = 1_650_000_000_456_000_000
IMPLICIT_DIRS = ["/".join(DEEP.split("/")[:i]) for i in range(1, 6)]  # parents that no tar lists
# Directories containerd's applier makes or writes into in a layer that has no header for them: they
# show the unpack time; the lazy view shows the directory below (or the epoch). Every other field matches.
UNPACK_TIME_DIRS = sorted([*IMPLICIT_DIRS, "x/nodir", "x/d1", "x/o2", "x/opq-file", "x/sym-parent", "x/to-parent"])


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
            # containerd's applier, field by field (the bottom layer is applied without overlay whiteouts):
            # a hardlink's own header sets owner, mode, xattrs and mtime of the shared inode, and its
            # chown drops a file capability; link counts are those left once the layer is applied; a
            # whiteout later in the bottom layer removes an entry; trusted.* xattrs are never set, user.*
            # only on files and directories; mtimes outside 1970..2262 become the epoch; a directory
            # listed twice keeps both headers' xattrs; a directory's mtime is set last, on whatever its
            # path then is; a whiteout makes its missing parents; a 0/0 character device is a whiteout;
            # a '0' entry with a trailing slash is a file.
            Member("x", "dir"),
            Member("x/hl-target", data=b"shared inode\n", uid=3, gid=4, mode=0o644, xattrs={"user.a": b"1"}, mtime_ns=T1),
            Member(
                "x/hl-link", "hardlink", linkname="x/hl-target", uid=7, gid=8, mode=0o4750, xattrs={"user.b": b"2"}, mtime_ns=T2
            ),
            Member("x/cap-target", data=b"caps\n", mode=0o755, xattrs={"security.capability": CAPABILITY}),
            Member("x/cap-link", "hardlink", linkname="x/cap-target", mode=0o755),
            Member("x/cap2-target", data=b"caps\n", mode=0o755),
            Member("x/cap2-link", "hardlink", linkname="x/cap2-target", mode=0o711, xattrs={"security.capability": CAPABILITY}),
            Member("x/relinked-a", data=b"old a\n"),
            Member("x/relinked-b", "hardlink", linkname="x/relinked-a"),
            Member("x/relinked-a", data=b"new a, same layer\n"),
            Member("x/gone-a", data=b"gone\n"),
            Member("x/gone-b", "hardlink", linkname="x/gone-a"),
            Member("x/.wh.gone-a"),
            Member("x/trusted-file", data=b"t\n", xattrs={"trusted.liftoff": b"1", "user.keep": b"1"}),
            Member("x/fifo-xattr", "fifo", xattrs={"user.dropped": b"1", "security.liftoff": b"kept"}),
            Member("x/char-xattr", "char", devmajor=1, devminor=5, xattrs={"user.dropped": b"1"}),
            Member("x/char-0-0", "char", mode=0o644),
            Member("x/before-epoch", data=b"old\n", mtime_ns=-100 * 10**9),
            Member("x/year-3000", data=b"late\n", mtime_ns=32_503_680_000 * 10**9),
            Member("x/twice", "dir", xattrs={"user.first": b"1"}, mtime_ns=T1),
            Member("x/twice", "dir", mode=0o700, xattrs={"user.second": b"2"}, mtime_ns=T2),
            Member("x/dir-then-file", "dir", mtime_ns=T1),
            Member("x/dir-then-file", data=b"was a dir header\n", mtime_ns=T2),
            Member("x/nodir/.wh.nothing"),
            Member("x/slash-file/", data=b"typeflag '0' with a trailing slash is a file\n"),
            Member("x/wh-after", data=b"removed later in the same layer\n"),
            Member("x/.wh.wh-after"),
            Member("x/to-parent", data=b"a file in layer 1\n"),
            Member("x/sym-parent", "symlink", linkname="to-parent"),
            Member("x/redo", "dir"),
            Member("x/redo/old", data=b"layer 1\n"),
            Member("x/opq-file", data=b"file in layer 1\n"),
            Member("x/d1", "dir", mode=0o700, uid=5, xattrs={"user.d": b"1"}),
            Member("x/d1/old", data=b"d1\n"),
            Member("x/d2", "dir", mode=0o700, uid=5, xattrs={"user.old": b"1"}),
            Member("x/o2", "dir"),
            Member("x/o2/old", data=b"hidden\n"),
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
            # a path beneath a file or symlink below makes a directory; a whiteout then a directory in
            # one layer leaves what lay below it visible (not opaque); an opaque marker on a file below
            # makes a directory; a directory first made as a parent then listed adds its xattrs.
            Member("x", "dir"),
            Member("x/to-parent/child", data=b"a file's path became a directory\n"),
            Member("x/sym-parent/child", data=b"a symlink's path became a directory\n"),
            Member("x/.wh.redo"),
            Member("x/redo", "dir"),
            Member("x/redo/new", data=b"layer 2\n"),
            Member("x/opq-file/.wh..wh..opq"),
            Member("x/d1/new", data=b"d1 new\n"),
            Member("x/d2/c", data=b"child before its directory\n"),
            Member("x/d2", "dir", xattrs={"user.new": b"2"}),
            Member("x/o2/new", data=b"before the marker\n"),
            Member("x/o2/.wh..wh..opq"),
            Member("x/hl2-target", data=b"l2\n"),
            Member("x/hl2-link", "hardlink", linkname="x/hl2-target", uid=9, gid=9, mode=0o600, mtime_ns=T2),
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
