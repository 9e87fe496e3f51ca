"""An emulated gp3 node disk: ext4 on a loop device, throttled like an EBS gp3 volume's baseline.

    with Gp3Disk(Path("/var/tmp/liftoff-bench/gp3"), size_gb=40) as disk:
        ...  # use disk.mountpoint; disk.check() measures what a dd sees

The backing file lives on this machine's disk; the loop device uses direct I/O, so reads and writes
reach the throttle instead of a second page cache. The throttle is the root blkio cgroup's (cgroup v1
here): `blkio.throttle.{read,write}_bps_device` 125 MB/s and `{read,write}_iops_device` 3000, gp3's
baseline. Buffered writes are throttled as they are written back (see ../shared/DESIGN.md 4b).
cgroup v1's throttle is not hierarchical: a process in a child blkio cgroup reads this device at full
speed (measured: 1.6 GB/s against 125 MB/s in the root), and runc puts every container in a cgroup of
its own. So a container that touches the disk runs in a cgroup made by `container_cgroup` (pass it to
`ctr run --cgroup`), which carries the same limits. The limits are removed and the device detached on
exit. Needs root, losetup and mkfs.ext4.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from pathlib import Path

BLKIO = Path("/sys/fs/cgroup/blkio")
CONTAINER_CGROUPS = "liftoff-gp3"  # the parent of the containers' throttled blkio cgroups
GP3_BPS = 125_000_000
GP3_IOPS = 3000
THROTTLES = {
    "blkio.throttle.read_bps_device": GP3_BPS,
    "blkio.throttle.write_bps_device": GP3_BPS,
    "blkio.throttle.read_iops_device": GP3_IOPS,
    "blkio.throttle.write_iops_device": GP3_IOPS,
}


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


class Gp3Disk:
    """A fresh ext4 file system on a throttled loop device, mounted at `workdir/mnt`."""

    def __init__(self, workdir: Path, size_gb: int = 40, throttle: bool = True) -> None:
        self.workdir = workdir
        self.size_gb = size_gb
        self.throttle = throttle
        self.image = workdir / "disk.img"
        self.mountpoint = workdir / "mnt"
        self.device = ""

    @property
    def major_minor(self) -> str:
        st = os.stat(self.device)
        return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"

    def __enter__(self) -> Gp3Disk:
        if self.throttle and not (BLKIO / "blkio.throttle.read_bps_device").exists():
            raise SystemExit(f"no blkio throttle at {BLKIO} (cgroup v1): cannot emulate a gp3 disk; run with --no-gp3")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._release_stale()
        self.image.unlink(missing_ok=True)
        with open(self.image, "wb") as f:
            f.truncate(self.size_gb << 30)
        self.device = _run("losetup", "-f", "--show", "--direct-io=on", str(self.image))
        try:
            _run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", self.device)
            self.mountpoint.mkdir(exist_ok=True)
            _run("mount", "-o", "noatime,discard", self.device, str(self.mountpoint))
            if self.throttle:
                for name, limit in THROTTLES.items():
                    (BLKIO / name).write_text(f"{self.major_minor} {limit}\n")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.device:
            return
        if self.throttle and (BLKIO / "blkio.throttle.read_bps_device").exists():
            for name in THROTTLES:
                with contextlib.suppress(OSError):  # best effort: the device goes next anyway
                    (BLKIO / name).write_text(f"{self.major_minor} 0\n")
        for _ in range(20):  # a container's mount may take a moment to go
            if subprocess.run(["umount", str(self.mountpoint)], capture_output=True).returncode == 0:
                break
            if not os.path.ismount(self.mountpoint):
                break
            time.sleep(0.5)
        else:
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
        subprocess.run(["losetup", "-d", self.device], capture_output=True)
        self.device = ""
        for cgroup in sorted((BLKIO / CONTAINER_CGROUPS).glob("*"), reverse=True):
            with contextlib.suppress(OSError):  # runc removes its own; one still in use stays
                cgroup.rmdir()
        self.image.unlink(missing_ok=True)

    def container_cgroup(self, name: str) -> str:
        """A blkio cgroup with this disk's limits for one container: `ctr run --cgroup` it (runc joins the
        existing blkio directory and leaves its throttle alone; it creates the other controllers' own)."""
        if not self.throttle:
            return ""
        path = BLKIO / CONTAINER_CGROUPS / f"{name}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        for file, limit in THROTTLES.items():
            (path / file).write_text(f"{self.major_minor} {limit}\n")
        return f"/{CONTAINER_CGROUPS}/{path.name}"

    def ctr_run_args(self, name: str) -> list[str]:
        """`ctr run` arguments that put a container under this disk's limits (none when unthrottled)."""
        cgroup = self.container_cgroup(name)
        return ["--cgroup", cgroup] if cgroup else []

    def _release_stale(self) -> None:
        """Unmount and detach what an interrupted run left on this workdir."""
        if os.path.ismount(self.mountpoint):
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
        for line in _run("losetup", "-a").splitlines():
            if str(self.image) in line:
                subprocess.run(["losetup", "-d", line.split(":", 1)[0]], capture_output=True)

    def check(self, mb: int = 512) -> dict[str, float]:
        """Write then read `mb` MB through the page cache (dd + sync, caches dropped): MB/s each way."""
        probe = self.mountpoint / "dd-probe"
        started = time.monotonic()
        _run("dd", "if=/dev/zero", f"of={probe}", "bs=1M", f"count={mb}", "conv=fsync")
        write = mb * 1.048576 / (time.monotonic() - started)
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3")
        started = time.monotonic()
        _run("dd", f"if={probe}", "of=/dev/null", "bs=1M")
        read = mb * 1.048576 / (time.monotonic() - started)
        probe.unlink()
        return {"write_mb_s": round(write, 1), "read_mb_s": round(read, 1)}

    def describe(self) -> str:
        limits = f"{GP3_BPS / 1e6:.0f} MB/s, {GP3_IOPS} IOPS each way" if self.throttle else "unthrottled"
        return f"ext4 on {self.device} (loop, direct I/O; {limits})"


if __name__ == "__main__":
    import sys

    with Gp3Disk(Path(sys.argv[1] if len(sys.argv) > 1 else "/var/tmp/liftoff-bench/gp3-check"), size_gb=4) as disk:
        print(disk.describe(), disk.check())
