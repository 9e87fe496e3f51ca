"""The benchmark images' layers store whole-second mtimes as Docker would (truncated), so the .pyc files pip
compiled stay valid in the image (umoci alone rounds, which made about half of them stale)."""

from __future__ import annotations

import os
import py_compile
import struct
from pathlib import Path

from benchmarks.build_images import truncate_mtimes

FRACTION = 700_000_000  # ns: rounding to the nearest second would move this mtime up


def _pyc_source_mtime(pyc: Path) -> int:
    flags, mtime = struct.unpack("<II", pyc.read_bytes()[4:12])
    assert flags == 0  # timestamp-based validation
    return mtime


def test_truncation_keeps_a_compiled_module_valid(tmp_path):
    source = tmp_path / "rootfs" / "pkg" / "mod.py"
    source.parent.mkdir(parents=True)
    source.write_text("x = 1\n")
    whole = 1_700_000_000
    os.utime(source, ns=(whole * 10**9, whole * 10**9 + FRACTION))
    pyc = Path(py_compile.compile(str(source), invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP))
    assert _pyc_source_mtime(pyc) == whole
    assert round((whole * 10**9 + FRACTION) / 10**9) != whole  # what a rounding tar writer would have stored

    truncate_mtimes(tmp_path / "rootfs")

    assert source.stat().st_mtime_ns == whole * 10**9
    assert _pyc_source_mtime(pyc) == int(source.stat().st_mtime)


def test_truncation_touches_only_fractional_mtimes_and_not_link_targets(tmp_path):
    root = tmp_path / "rootfs"
    (root / "dir").mkdir(parents=True)
    target = root / "dir" / "target"
    target.write_bytes(b"")
    untouched = root / "whole"
    untouched.write_bytes(b"")
    link = root / "link"
    link.symlink_to("dir/target")
    os.utime(target, ns=(5, 1_600_000_000_000_000_000))  # whole seconds: left alone, atime too
    os.utime(untouched, ns=(7, 1_500_000_000_000_000_000))
    os.utime(link, ns=(0, 1_650_000_000_250_000_000), follow_symlinks=False)
    os.utime(root / "dir", ns=(0, 1_650_000_000_999_999_999))

    truncate_mtimes(root)

    assert os.lstat(link).st_mtime_ns == 1_650_000_000_000_000_000
    assert target.stat().st_mtime_ns == 1_600_000_000_000_000_000 and target.stat().st_atime_ns == 5
    assert untouched.stat().st_atime_ns == 7
    assert (root / "dir").stat().st_mtime_ns == 1_650_000_000_000_000_000
    assert all(os.lstat(p).st_mtime_ns % 10**9 == 0 for p in [root, *root.rglob("*")])
