"""Test images whose every byte and bit of metadata is known, and an oracle that
reads layer tars with Python's own tarfile (an independent parser)."""

from __future__ import annotations

import io
import os
import random
import tarfile

from layerstore.pb.liftoff.index.v1 import index_pb2 as pb
from liftoff.devstack.ocibuild import Member, make_tar

CHUNK = 64 << 10  # small chunks so small test data exercises chunking

CAPABILITY = bytes([1, 0, 0, 2, 0x00, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])  # cap_net_bind_service
NON_UTF8 = b"\xff\xfe-binary-name.bin".decode("utf-8", "surrogateescape")


def _random(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def kitchen_sink_layers() -> list[bytes]:
    """Two layers covering every entry kind, edge sizes, odd names, whiteouts and opaque dirs."""
    deep = "/".join(f"d{i:02d}-{'x' * 20}" for i in range(8))
    small = [Member(f"small/f{i:03d}.txt", data=f"small file {i}\n".encode() * (i % 7 + 1)) for i in range(150)]
    layer1 = make_tar(
        [
            Member("./", "dir", mode=0o755),
            Member("bin", "dir"),
            Member("etc", "dir", mode=0o755, mtime_ns=1_600_000_000_123_456_789),
            Member("etc/hostname", data=b"liftoff\n", uid=0, gid=0),
            Member("etc/conf.d", "dir"),
            Member("etc/conf.d/a.conf", data=b"a=1\n"),
            Member("etc/conf.d/b.conf", data=b"b=2\n"),
            Member("tmp", "dir", mode=0o1777),
            Member("small", "dir"),
            *small,
            Member("data", "dir", uid=1000, gid=1000, uname="app", gname="app"),
            Member("data/empty", data=b""),
            Member("data/one-chunk", data=_random(CHUNK, 1)),
            Member("data/chunk-plus-one", data=_random(CHUNK + 1, 2)),
            Member("data/three-and-a-bit", data=_random(3 * CHUNK + 17, 3)),
            Member("data/zeros", data=bytes(5 * CHUNK + 5)),
            Member("data/owned", data=b"owned\n", uid=1000, gid=1001, uname="app", gname="staff", mode=0o640),
            Member("bin/tool", data=b"#!/bin/sh\necho tool\n", mode=0o4755),
            Member("bin/sgid", data=b"sgid\n", mode=0o2755),
            Member("bin/ping", data=b"\x7fELF-not-really", mode=0o755, xattrs={"security.capability": CAPABILITY}),
            Member(
                "data/tagged", data=b"tagged", xattrs={"user.comment": b"hello \xe2\x9c\x93", "trusted.overlay.x": b"\x00\x01"}
            ),
            Member("bin/sh-abs", "symlink", linkname="/bin/tool"),
            Member("bin/sh-rel", "symlink", linkname="../bin/tool"),
            Member("bin/dangling", "symlink", linkname="/nowhere/at/all"),
            Member("bin/tool-hardlink", "hardlink", linkname="bin/tool"),
            Member("data/big-hardlink", "hardlink", linkname="data/three-and-a-bit"),
            Member("dev", "dir"),
            Member("dev/null", "char", devmajor=1, devminor=3, mode=0o666),
            Member("dev/sda", "block", devmajor=8, devminor=0, mode=0o660),
            Member("dev/pipe", "fifo", mode=0o600),
            Member(deep, "dir"),
            Member(deep + "/" + "long-name-" + "y" * 150 + ".txt", data=b"long\n"),
            Member("naïve-日本語-файл.txt", data="unicode ✓\n".encode()),
            Member(NON_UTF8, data=b"not utf-8 name\n"),
            Member("data/ns-mtime", data=b"ns", mtime_ns=1_700_000_000_987_654_321),
            Member("old", "dir"),
            Member("old/keep", data=b"keep\n"),
            Member("old/gone", data=b"gone\n"),
            Member("opaque", "dir"),
            Member("opaque/hidden", data=b"hidden by an opaque dir above\n"),
        ]
    )
    layer2 = make_tar(
        [
            Member("old/.wh.gone"),
            Member("opaque", "dir"),
            Member("opaque/.wh..wh..opq"),
            Member("opaque/visible", data=b"new\n"),
            Member("etc/hostname", data=b"replaced\n"),
            Member("new", "dir"),
            Member("new/file", data=_random(2 * CHUNK, 9)),
            Member("new/file-link", "hardlink", linkname="new/file"),
            Member("data/one-chunk-again", data=_random(CHUNK, 1)),  # same bytes as layer 1: dedupes
        ]
    )
    return [layer1, layer2]


def many_files_layer(count: int = 2000, seed: int = 5) -> bytes:
    """A layer of many small files of random sizes plus a few large ones."""
    rng = random.Random(seed)
    members = [Member("app", "dir")]
    for i in range(count):
        members.append(Member(f"app/m{i // 100:02d}/f{i:05d}.py", data=rng.randbytes(rng.randint(0, 3000))))
    for i in range(3):
        members.append(Member(f"app/lib{i}.so", data=rng.randbytes(rng.randint(CHUNK, 6 * CHUNK))))
    dirs = {f"app/m{i // 100:02d}" for i in range(count)}
    return make_tar([members[0], *[Member(d, "dir") for d in sorted(dirs)], *members[1:]])


def oracle_entries(tar: bytes) -> list[dict]:
    """What a layer tar holds, read by Python's tarfile, in the index's vocabulary."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        for m in tf:
            raw = m.name.encode("utf-8", "surrogateescape")
            path = b"/".join(p for p in raw.split(b"/") if p not in (b"", b"."))
            parent, _, base = path.rpartition(b"/")
            kind = {
                tarfile.REGTYPE: pb.ENTRY_TYPE_REGULAR,
                tarfile.AREGTYPE: pb.ENTRY_TYPE_REGULAR,
                tarfile.DIRTYPE: pb.ENTRY_TYPE_DIRECTORY,
                tarfile.SYMTYPE: pb.ENTRY_TYPE_SYMLINK,
                tarfile.LNKTYPE: pb.ENTRY_TYPE_HARDLINK,
                tarfile.CHRTYPE: pb.ENTRY_TYPE_CHAR_DEVICE,
                tarfile.BLKTYPE: pb.ENTRY_TYPE_BLOCK_DEVICE,
                tarfile.FIFOTYPE: pb.ENTRY_TYPE_FIFO,
            }[m.type]
            if base == b".wh..wh..opq":
                kind, path = pb.ENTRY_TYPE_OPAQUE, parent
            elif base.startswith(b".wh."):
                kind, path = pb.ENTRY_TYPE_WHITEOUT, (parent + b"/" if parent else b"") + base[4:]
            pax_mtime = m.pax_headers.get("mtime")
            if pax_mtime:
                sec, _, frac = pax_mtime.partition(".")
                mtime_ns = int(sec) * 10**9 + int((frac + "000000000")[:9])
            else:
                mtime_ns = int(m.mtime) * 10**9
            link = m.linkname.encode("utf-8", "surrogateescape")
            out.append(
                {
                    "path": path,
                    "type": kind,
                    "mode": m.mode & 0o7777,
                    "uid": m.uid,
                    "gid": m.gid,
                    "uname": m.uname,
                    "gname": m.gname,
                    "size": m.size if kind == pb.ENTRY_TYPE_REGULAR else 0,
                    "mtime_ns": mtime_ns,
                    "link_target": link,
                    "xattrs": {
                        k[len("SCHILY.xattr.") :]: v.encode("utf-8", "surrogateescape")
                        for k, v in m.pax_headers.items()
                        if k.startswith("SCHILY.xattr.")
                    },
                    "dev_major": m.devmajor if kind in (pb.ENTRY_TYPE_CHAR_DEVICE, pb.ENTRY_TYPE_BLOCK_DEVICE) else 0,
                    "dev_minor": m.devminor if kind in (pb.ENTRY_TYPE_CHAR_DEVICE, pb.ENTRY_TYPE_BLOCK_DEVICE) else 0,
                    "content": tf.extractfile(m).read() if kind == pb.ENTRY_TYPE_REGULAR else b"",
                }
            )
    return out


def stored_entries(index: pb.LayerIndex, chunk) -> list[dict]:
    """The same view of a layer rebuilt from its index and chunks (`chunk(i)` -> bytes)."""
    out = []
    for e in index.entries:
        content = b"".join(bytes(chunk(x.chunk)[x.offset : x.offset + x.length]) for x in e.extents)
        out.append(
            {
                "path": e.path,
                "type": e.type,
                "mode": e.mode,
                "uid": e.uid,
                "gid": e.gid,
                "uname": e.uname,
                "gname": e.gname,
                "size": e.size,
                "mtime_ns": e.mtime_ns,
                "link_target": e.link_target,
                "xattrs": dict(e.xattrs),
                "dev_major": e.dev_major,
                "dev_minor": e.dev_minor,
                "content": content,
            }
        )
    return out


def random_bytes(n: int) -> bytes:
    return os.urandom(n)
