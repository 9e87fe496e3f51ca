"""The streaming tar reader against Python's tarfile, across tar dialects, and on hostile input."""

from __future__ import annotations

import io
import tarfile

import pytest

from layerstore.errors import ImageError
from layerstore.pb.liftoff.index.v1 import index_pb2 as pb
from layerstore.tarstream import TarReader, normalize_path
from tests.converter.images import kitchen_sink_layers, many_files_layer, oracle_entries

FIELDS = (
    "path",
    "type",
    "mode",
    "uid",
    "gid",
    "uname",
    "gname",
    "size",
    "mtime_ns",
    "link_target",
    "xattrs",
    "dev_major",
    "dev_minor",
)


def read_all(tar: bytes, bufsize: int = 1 << 20) -> list[dict]:
    reader = TarReader(io.BufferedReader(io.BytesIO(tar), bufsize))
    out = []
    for entry in reader:
        content = bytearray()
        if entry.type == pb.ENTRY_TYPE_REGULAR:
            buf = bytearray(7919)  # an odd size: reads straddle every boundary
            while n := reader.readinto(memoryview(buf)):
                content += buf[:n]
        out.append({**{f: getattr(entry, f) for f in FIELDS}, "content": bytes(content)})
    return out


@pytest.mark.parametrize("layer", [0, 1])
def test_pax_layers_match_tarfile(layer):
    tar = kitchen_sink_layers()[layer]
    assert read_all(tar) == oracle_entries(tar)


def test_many_files_match_tarfile():
    tar = many_files_layer(500)
    assert read_all(tar, bufsize=4096) == oracle_entries(tar)


def _tar(fmt: int, members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def _info(name: str, **kw) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    for k, v in kw.items():
        setattr(info, k, v)
    return info


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT])
def test_long_names_and_big_ids_in_every_dialect(fmt):
    long_dir = "/".join(["p" * 40] * 3)  # 122 chars: ustar needs its prefix field
    data = b"payload" * 100
    members = [
        (_info(long_dir, type=tarfile.DIRTYPE, mode=0o755), b""),
        (_info(long_dir + "/file.bin", size=len(data), mode=0o644, uid=1234, gid=4321, mtime=1_650_000_000), data),
        (_info(long_dir + "/link", type=tarfile.SYMTYPE, linkname="file.bin"), b""),
    ]
    if fmt != tarfile.USTAR_FORMAT:
        long_name = "q" * 180
        members.append((_info(long_name, size=3, uid=3_000_000), b"abc"))  # uid > 8**7: base-256 (GNU) or pax
        members.append((_info("hl", type=tarfile.LNKTYPE, linkname=long_name), b""))
    tar = _tar(fmt, members)
    assert read_all(tar) == oracle_entries(tar)


def test_trailing_padding_is_consumed():
    tar = kitchen_sink_layers()[1] + bytes(10240)
    stream = io.BytesIO(tar)
    list(TarReader(stream))
    assert stream.tell() == len(tar)


def test_normalize_path():
    assert normalize_path(b"./a//b/./c/") == b"a/b/c"
    assert normalize_path(b"./") == b""
    for bad in (b"../x", b"a/../../x", b"a/.."):
        with pytest.raises(ImageError, match=r"'\.\.'"):
            normalize_path(bad)
    with pytest.raises(ImageError, match="absolute"):
        normalize_path(b"/etc/passwd")


HOSTILE = [
    ([_info("../evil", size=1)], "contains '..'"),
    ([_info("/etc/passwd", size=1)], "absolute path"),
    ([_info("ok/../../escape", size=1)], "contains '..'"),
    ([_info("hl", type=tarfile.LNKTYPE, linkname="missing")], "not an earlier entry"),
    ([_info("hl", type=tarfile.LNKTYPE, linkname="../../etc/shadow")], "contains '..'"),
    ([_info("d", type=tarfile.DIRTYPE), _info("hl", type=tarfile.LNKTYPE, linkname="d")], "hardlink to a directory"),
    ([_info("lnk", type=tarfile.SYMTYPE, linkname="/etc"), _info("lnk/passwd", size=1)], "beneath the symlink"),
    ([_info("lnk", type=tarfile.SYMTYPE, linkname="../.."), _info("lnk/x/y", type=tarfile.DIRTYPE)], "beneath the symlink"),
]


@pytest.mark.parametrize(("members", "message"), HOSTILE, ids=[m for _, m in HOSTILE] and None)
def test_hostile_entries_are_refused(members, message):
    tar = _tar(tarfile.PAX_FORMAT, [(m, b"x" * m.size) for m in members])
    with pytest.raises(ImageError, match=message):
        read_all(tar)


def test_symlink_replaced_by_directory_is_fine():
    members = [
        _info("x", type=tarfile.SYMTYPE, linkname="/etc"),
        _info("x", type=tarfile.DIRTYPE),
        _info("x/file", size=1),
    ]
    tar = _tar(tarfile.PAX_FORMAT, [(m, b"y" * m.size) for m in members])
    assert [e["path"] for e in read_all(tar)] == [b"x", b"x", b"x/file"]


def test_corrupt_header_checksum():
    tar = bytearray(_tar(tarfile.PAX_FORMAT, [(_info("f", size=3), b"abc")]))
    tar[0] ^= 0x20
    with pytest.raises(ImageError, match="checksum mismatch"):
        read_all(bytes(tar))


def test_truncated_data():
    tar = _tar(tarfile.PAX_FORMAT, [(_info("f", size=5000), b"z" * 5000)])
    with pytest.raises(ImageError, match="truncated tar"):
        read_all(tar[:1500])


def test_gnu_sparse_is_refused():
    header = bytearray(_tar(tarfile.GNU_FORMAT, [(_info("sparse", size=0), b"")])[:512])
    header[156:157] = b"S"
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    with pytest.raises(ImageError, match="sparse"):
        read_all(bytes(header) + bytes(1024))


def test_aufs_metadata_is_skipped_like_containerd():
    members = [_info(".wh..wh.plnk", type=tarfile.DIRTYPE), _info(".wh..wh.plnk/123.456", size=2), _info("kept", size=1)]
    tar = _tar(tarfile.PAX_FORMAT, [(m, b"q" * m.size) for m in members])
    assert [e["path"] for e in read_all(tar)] == [b"kept"]


def test_trailing_slash_means_directory_only_for_pre_posix_typeflag():
    """Go's reader (so containerd) reads a '\\0' entry "d/" as a directory, a '0' entry "f/" as a file."""
    tar = bytearray(_tar(tarfile.USTAR_FORMAT, [(_info("d/", size=0), b""), (_info("f/", size=4), b"data")]))
    tar[156] = 0  # the first header's typeflag: '\0'
    tar[148:156] = b"        "
    tar[148:156] = b"%06o\0 " % sum(tar[:512])
    assert [(e["path"], e["type"], e["content"]) for e in read_all(bytes(tar))] == [
        (b"d", pb.ENTRY_TYPE_DIRECTORY, b""),
        (b"f", pb.ENTRY_TYPE_REGULAR, b"data"),
    ]


def test_times_past_2262_are_the_epoch():
    """Nanoseconds past int64 (year 2262) fit no index; containerd's applier sets the epoch for them."""
    tar = _tar(tarfile.PAX_FORMAT, [(_info("late", size=1, mtime=32_503_680_000), b"x"), (_info("ok", size=1, mtime=-5), b"y")])
    assert [(e["path"], e["mtime_ns"]) for e in read_all(tar)] == [(b"late", 0), (b"ok", -5 * 10**9)]
