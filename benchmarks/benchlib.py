"""Shared helpers for the benchmarks: timing child processes with their peak RSS, tables, machine info."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Timed:
    seconds: float
    peak_rss_mb: float
    stdout: str


def timed(argv: list[str], env: dict | None = None, cwd: str | None = None) -> Timed:
    """Run a command to completion: wall seconds and the child's peak RSS (os.wait4 rusage)."""
    started = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)
    out: list[bytes] = []
    err: list[bytes] = []

    def drain(stream, sink: list[bytes]) -> None:
        for block in iter(lambda: stream.read(65536), b""):
            sink.append(block)

    readers = [
        threading.Thread(target=drain, args=(process.stdout, out)),
        threading.Thread(target=drain, args=(process.stderr, err)),
    ]
    for reader in readers:
        reader.start()
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.monotonic() - started
    for reader in readers:
        reader.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({process.returncode}): {b''.join(err).decode(errors='replace')[-2000:]}")
    return Timed(elapsed, usage.ru_maxrss / 1024, b"".join(out).decode(errors="replace"))


def drop_caches(keep_warm: tuple = ()) -> None:
    """Drop the kernel's page, dentry and inode caches (a cold node), then read `keep_warm` back
    in: the directories of the emulated remote servers (registry, store), which in reality serve
    at network speed, not at this machine's disk speed."""
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")
    for root in keep_warm:
        for dirpath, _, filenames in os.walk(root):
            for name in filenames:
                with open(os.path.join(dirpath, name), "rb", buffering=0) as f:
                    while f.read(1 << 22):
                        pass


@contextlib.contextmanager
def liftoff_node(workdir: Path, store: str):
    """A fresh node: the FUSE daemon, the liftoff snapshotter and containerd using it (stopped afterwards)."""
    from snapshotter.localnode import start_containerd, start_fused, start_snapshotter

    socket = workdir / "run" / "snapshotter.sock"
    fused = start_fused(workdir / "root" / "remote", ["--store", store], workdir=workdir)
    snapshotter = containerd = None
    try:
        snapshotter = start_snapshotter(
            workdir / "root", socket, workdir=workdir, log_level="info", extra_args=["--store", store, "--no-start-fused"]
        )
        containerd = start_containerd(workdir / "containerd", socket)
        yield containerd
    finally:
        if containerd:
            containerd.stop()
        if snapshotter:
            snapshotter.stop()
        fused.stop()


def machine() -> str:
    """A one-line description of this machine."""
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "?")
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def load_average() -> float:
    """The 1-minute load average (other work on the machine skews timings)."""
    return os.getloadavg()[0]


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A plain-text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
