"""A streaming, validating tar reader for OCI layers.

Reads ustar, pax (including xattrs and nanosecond mtimes) and GNU long-name
archives from a forward-only stream: one header at a time, file data read by
the caller straight into its own buffers. OCI whiteouts become WHITEOUT and
OPAQUE entries. Hostile input is refused with ImageError: paths that are
absolute or contain "..", entries beneath a symlink of the same layer,
hardlinks to missing or non-file targets, corrupt headers, truncated data,
pax headers and GNU long names over MAX_SPECIAL_BYTES.
"""

from __future__ import annotations

import base64
import posixpath
from dataclasses import dataclass, field
from typing import BinaryIO
from urllib.parse import unquote_to_bytes

from layerstore.errors import ImageError
from layerstore.pb.liftoff.index.v1 import index_pb2 as pb

BLOCK = 512
# Metadata the reader holds in memory is capped, as Go's archive/tar caps it (1 MiB): one pax extended
# header, the pax records held for one entry or globally, and a GNU long name or link. Real layers need
# a few KiB (Linux paths stop at 4 KiB, xattr values at 64 KiB); a larger header is refused unread.
MAX_SPECIAL_BYTES = 1 << 20
_SPECIAL = {b"x": "pax extended header", b"g": "pax global header", b"L": "GNU long name", b"K": "GNU long link name"}
WHITEOUT_PREFIX = b".wh."
WHITEOUT_META_PREFIX = b".wh..wh."
OPAQUE_MARKER = b".wh..wh..opq"

_TYPES = {
    b"0": pb.ENTRY_TYPE_REGULAR,
    b"\0": pb.ENTRY_TYPE_REGULAR,
    b"7": pb.ENTRY_TYPE_REGULAR,
    b"1": pb.ENTRY_TYPE_HARDLINK,
    b"2": pb.ENTRY_TYPE_SYMLINK,
    b"3": pb.ENTRY_TYPE_CHAR_DEVICE,
    b"4": pb.ENTRY_TYPE_BLOCK_DEVICE,
    b"5": pb.ENTRY_TYPE_DIRECTORY,
    b"6": pb.ENTRY_TYPE_FIFO,
    b"D": pb.ENTRY_TYPE_DIRECTORY,  # GNU dumpdir: a directory with a listing we ignore
}
_UNSUPPORTED = {b"S": "GNU sparse file", b"M": "multi-volume continuation", b"N": "GNU old long name"}
_LINKABLE = {
    pb.ENTRY_TYPE_REGULAR,
    pb.ENTRY_TYPE_SYMLINK,
    pb.ENTRY_TYPE_CHAR_DEVICE,
    pb.ENTRY_TYPE_BLOCK_DEVICE,
    pb.ENTRY_TYPE_FIFO,
}


@dataclass(slots=True)
class TarEntry:
    """One member of a layer, with its path already normalized and whiteouts decoded."""

    path: bytes
    type: int
    mode: int = 0
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    size: int = 0
    mtime_ns: int = 0
    link_target: bytes = b""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    dev_major: int = 0
    dev_minor: int = 0
    raw_name: bytes = b""


def normalize_path(raw: bytes, what: str = "path") -> bytes:
    """Clean a tar path to "a/b/c" ("" for the root); refuse absolute paths and "..".

    A path that could escape the root when extracted is refused outright: layers
    are built by tools that never write one.
    """
    if raw.startswith(b"/"):
        raise ImageError(f"tar entry {_show(raw)}: absolute {what} escapes the layer root")
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise ImageError(f"tar entry {_show(raw)}: {what} contains '..' and could escape the layer root")
    return b"/".join(parts)


def _show(name: bytes) -> str:
    return repr(name.decode("utf-8", "backslashreplace"))


def _number(field_bytes: bytes, what: str) -> int:
    if field_bytes and field_bytes[0] & 0x80:  # base-256 (GNU/star extension)
        value = int.from_bytes(field_bytes, "big")
        if field_bytes[0] == 0xFF:  # negative, two's complement
            value -= 1 << (8 * len(field_bytes))
        else:
            value &= (1 << (8 * len(field_bytes) - 1)) - 1
        return value
    text = field_bytes.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise ImageError(f"corrupt tar header: invalid {what} field {field_bytes!r}") from None


def _parse_time_ns(text: bytes) -> int:
    sign = -1 if text.startswith(b"-") else 1
    whole, _, frac = text.lstrip(b"-").partition(b".")
    try:
        return sign * (int(whole or b"0") * 1_000_000_000 + int((frac + b"000000000")[:9]))
    except ValueError:
        raise ImageError(f"corrupt pax header: invalid time {text!r}") from None


def _parse_pax(data: bytes) -> dict[bytes, bytes]:
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # zero padding after the last record
            break
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise ImageError("corrupt pax header: bad record length") from None
        record = data[space + 1 : pos + length]
        if space < 0 or length <= 0 or pos + length > len(data) or not record.endswith(b"\n"):
            raise ImageError("corrupt pax header: record overruns the header")
        key, eq, value = record[:-1].partition(b"=")
        if not eq:
            raise ImageError("corrupt pax header: record without '='")
        records[key] = value
        pos += length
    return records


class TarReader:
    """Iterate a tar stream's entries; read each regular file's data with readinto().

    Data left unread when the next entry is requested is skipped. After the
    last entry the rest of the stream (end blocks, padding) is drained, so
    hashes computed over the stream cover all of it.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._f = stream
        self._remaining = 0  # data bytes of the current entry not yet read
        self._padding = 0
        self._data_size = 0
        self._global_pax: dict[bytes, bytes] = {}
        self._kinds: dict[bytes, int] = {}  # path -> type, for hardlink and symlink checks
        self._symlinks: set[bytes] = set()
        self.entries_read = 0
        self._last_name: bytes | None = None  # the latest entry's name, to place an error
        self.skipped: list[bytes] = []  # aufs metadata entries ignored as containerd does

    def _read_exact(self, n: int) -> bytes:
        data = self._f.read(n)
        if len(data) != n:
            raise ImageError("truncated tar: the stream ended inside an entry")
        return data

    def _skip(self, n: int) -> None:
        while n > 0:
            got = len(self._f.read(min(n, 1 << 20)))
            if got == 0:
                raise ImageError("truncated tar: the stream ended inside an entry")
            n -= got

    def readinto(self, view: memoryview) -> int:
        """Read the current entry's data into `view` (at most what is left); returns bytes read."""
        want = min(len(view), self._remaining)
        done = 0
        while done < want:
            got = self._f.readinto(view[done:want])
            if not got:
                raise ImageError("truncated tar: the stream ended inside a file's data")
            done += got
        self._remaining -= done
        return done

    def __iter__(self):
        return self

    def __next__(self) -> TarEntry:
        while True:
            self._skip(self._remaining + self._padding)
            self._remaining = self._padding = 0
            entry = self._next_member()
            if entry is None:
                self._drain()
                raise StopIteration
            if entry.type >= 0:
                self.entries_read += 1
                return entry

    def _drain(self) -> None:
        while self._f.read(1 << 20):
            pass

    def _next_member(self) -> TarEntry | None:
        pax: dict[bytes, bytes] = {}
        long_name = long_link = None
        while True:
            header = self._f.read(BLOCK)
            if not header:
                return None  # no end-of-archive blocks: accepted, as tar and containerd do
            if len(header) != BLOCK:
                raise ImageError("truncated tar: the stream ended inside a header")
            if header == bytes(BLOCK):
                return None
            self._check_sum(header)
            typeflag = header[156:157]
            size = _number(header[124:136], "size")
            if size < 0:
                raise ImageError("corrupt tar header: negative size")
            padded = -size % BLOCK
            if typeflag in _SPECIAL:
                held = _held(self._global_pax if typeflag == b"g" else pax) if typeflag in (b"x", b"g") else 0
                self._check_special(header, typeflag, size, held)
            if typeflag in (b"x", b"g"):
                records = _parse_pax(self._read_exact(size))
                self._skip(padded)
                if typeflag == b"g":
                    self._global_pax.update(records)
                else:
                    pax.update(records)
                continue
            if typeflag in (b"L", b"K"):
                value = self._read_exact(size).split(b"\0", 1)[0]
                self._skip(padded)
                if typeflag == b"L":
                    long_name = value
                else:
                    long_link = value
                continue
            entry = self._member(header, typeflag, size, {**self._global_pax, **pax}, long_name, long_link)
            self._last_name = entry.raw_name or entry.path
            data = self._data_size
            if entry.type == pb.ENTRY_TYPE_REGULAR:
                self._remaining, self._padding = data, -data % BLOCK
            else:  # data of other entry types (rare) is skipped, not indexed
                self._remaining, self._padding = 0, data + (-data % BLOCK)
                entry.size = 0
            return entry

    def _check_special(self, header: bytes, typeflag: bytes, size: int, held: int) -> None:
        """Refuse a pax header or GNU long name over MAX_SPECIAL_BYTES before reading it into memory."""
        if size + held <= MAX_SPECIAL_BYTES:
            return
        name = _show(header[0:100].split(b"\0", 1)[0])
        place = f"after {_show(self._last_name)}" if self._last_name is not None else "the first header"
        also = f" (with {held} bytes of pax records already held)" if held else ""
        raise ImageError(
            f"tar entry {name} ({place}): {_SPECIAL[typeflag]} of {size} bytes{also} is over the "
            f"{MAX_SPECIAL_BYTES >> 20} MiB limit for tar metadata; no tar tool writes one: the layer is hostile or corrupt"
        )

    @staticmethod
    def _check_sum(header: bytes) -> None:
        try:
            stored = _number(header[148:156], "checksum")
        except ImageError:
            stored = -1
        unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
        if stored == unsigned:
            return
        signed = unsigned - 2 * sum(b for b in header[:148] + header[156:] if b > 127)
        if stored != signed:
            raise ImageError("corrupt tar header: checksum mismatch (not a tar stream, or damaged)")

    def _member(
        self,
        header: bytes,
        typeflag: bytes,
        size: int,
        pax: dict[bytes, bytes],
        long_name: bytes | None,
        long_link: bytes | None,
    ) -> TarEntry:
        name = header[0:100].split(b"\0", 1)[0]
        if header[257:265] == b"ustar\x0000":
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        name = pax.get(b"path", long_name if long_name is not None else name)
        link = pax.get(b"linkpath", long_link if long_link is not None else header[157:257].split(b"\0", 1)[0])
        if typeflag in _UNSUPPORTED:
            raise ImageError(f"tar entry {_show(name)}: unsupported {_UNSUPPORTED[typeflag]} (typeflag {typeflag!r})")
        if any(k.startswith(b"GNU.sparse.") for k in pax):
            raise ImageError(f"tar entry {_show(name)}: unsupported GNU sparse file (pax GNU.sparse.*)")
        if typeflag == b"V":
            self._data_size = size
            return TarEntry(path=b"", type=-1)  # volume label: not content
        kind = _TYPES.get(typeflag)
        if kind is None:
            raise ImageError(f"tar entry {_show(name)}: unsupported typeflag {typeflag!r}")
        if typeflag == b"\0" and name.endswith(b"/"):
            kind = pb.ENTRY_TYPE_DIRECTORY  # pre-POSIX tars mark directories so; a '0' file "x/" stays a file (Go's reader)
        try:
            entry = TarEntry(
                path=normalize_path(name),
                type=kind,
                mode=_number(header[100:108], "mode") & 0o7777,
                uid=int(pax[b"uid"]) if b"uid" in pax else _number(header[108:116], "uid"),
                gid=int(pax[b"gid"]) if b"gid" in pax else _number(header[116:124], "gid"),
                uname=pax.get(b"uname", header[265:297].split(b"\0", 1)[0]).decode("utf-8", "replace"),
                gname=pax.get(b"gname", header[297:329].split(b"\0", 1)[0]).decode("utf-8", "replace"),
                size=int(pax[b"size"]) if b"size" in pax else size,
                mtime_ns=_parse_time_ns(pax[b"mtime"]) if b"mtime" in pax else _number(header[136:148], "mtime") * 10**9,
                xattrs=_xattrs(pax),
                raw_name=name,
            )
        except ValueError:
            raise ImageError(f"tar entry {_show(name)}: corrupt pax header (non-numeric uid, gid or size)") from None
        if not (0 <= entry.uid < 2**32 and 0 <= entry.gid < 2**32) or entry.size < 0:
            raise ImageError(f"tar entry {_show(name)}: uid, gid or size out of range")
        if not -(2**63) <= entry.mtime_ns < 2**63:
            entry.mtime_ns = 0  # past 2262 in nanoseconds: containerd's applier sets the epoch
        self._data_size = entry.size
        if kind in (pb.ENTRY_TYPE_CHAR_DEVICE, pb.ENTRY_TYPE_BLOCK_DEVICE):
            entry.dev_major = _number(header[329:337], "devmajor")
            entry.dev_minor = _number(header[337:345], "devminor")
        if kind == pb.ENTRY_TYPE_SYMLINK:
            entry.link_target = link
        elif kind == pb.ENTRY_TYPE_HARDLINK:
            entry.link_target = normalize_path(link, "hardlink target")
        self._classify(entry)
        return entry

    def _classify(self, entry: TarEntry) -> None:
        """Decode whiteouts and check the entry against the layer's earlier entries."""
        path = entry.path
        if not path and entry.type != pb.ENTRY_TYPE_DIRECTORY:
            raise ImageError("tar entry for the layer root is not a directory")
        parent, _, base = path.rpartition(b"/")
        if path.startswith(WHITEOUT_META_PREFIX) and path != OPAQUE_MARKER:
            self.skipped.append(path)  # aufs metadata (.wh..wh.plnk/...): not content
            entry.type = -1
            return
        self._check_not_beneath_symlink(entry)
        if base.startswith(WHITEOUT_PREFIX):
            if base == OPAQUE_MARKER:
                entry.type, entry.path = pb.ENTRY_TYPE_OPAQUE, parent
            elif base.startswith(WHITEOUT_META_PREFIX):
                self.skipped.append(path)
                entry.type = -1
                return
            elif base == WHITEOUT_PREFIX:
                raise ImageError(f"tar entry {_show(path)}: whiteout names no file")
            else:
                entry.type = pb.ENTRY_TYPE_WHITEOUT
                entry.path = (parent + b"/" if parent else b"") + base[len(WHITEOUT_PREFIX) :]
            entry.size = 0
            self._symlinks.discard(entry.path)
            if entry.type == pb.ENTRY_TYPE_WHITEOUT:
                self._kinds.pop(entry.path, None)
            return
        if entry.type == pb.ENTRY_TYPE_HARDLINK:
            target = self._kinds.get(entry.link_target)
            if target is None:
                raise ImageError(
                    f"tar entry {_show(path)}: hardlink to {_show(entry.link_target)}, "
                    "which is not an earlier entry of this layer"
                )
            if target not in _LINKABLE:
                raise ImageError(f"tar entry {_show(path)}: hardlink to a directory {_show(entry.link_target)}")
            self._kinds[path] = target
        else:
            self._kinds[path] = entry.type
        if entry.type == pb.ENTRY_TYPE_SYMLINK:
            self._symlinks.add(path)
        else:
            self._symlinks.discard(path)

    def _check_not_beneath_symlink(self, entry: TarEntry) -> None:
        if not self._symlinks:
            return
        parent = posixpath.dirname(entry.path)
        while parent:
            if parent in self._symlinks:
                raise ImageError(
                    f"tar entry {_show(entry.raw_name)}: lies beneath the symlink {_show(parent)} "
                    "of the same layer (a link escaping the root)"
                )
            parent = posixpath.dirname(parent)


def _held(records: dict[bytes, bytes]) -> int:
    return sum(len(k) + len(v) for k, v in records.items())


def _xattrs(pax: dict[bytes, bytes]) -> dict[str, bytes]:
    xattrs: dict[str, bytes] = {}
    for key, value in pax.items():
        if key.startswith(b"SCHILY.xattr."):
            xattrs[key[len(b"SCHILY.xattr.") :].decode("utf-8", "surrogateescape")] = value
        elif key.startswith(b"LIBARCHIVE.xattr."):
            name = unquote_to_bytes(key[len(b"LIBARCHIVE.xattr.") :]).decode("utf-8", "surrogateescape")
            try:
                xattrs[name] = base64.b64decode(value + b"=" * (-len(value) % 4))
            except ValueError:
                raise ImageError(f"corrupt pax header: xattr {name!r} is not base64") from None
    return xattrs
