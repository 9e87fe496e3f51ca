#!/usr/bin/env python3
"""FUSE micro-benchmark: the lazy view against containerd's overlayfs on the same image.

    scripts/bench fuse_micro

Two measurements on the torch image, each on an overlay mount of the liftoff view (FUSE
lower) and of containerd's overlayfs unpack: a sequential read of its largest file (the
434 MB libtorch_cpu.so) with the chunks already in liftoff's local cache and the kernel's
page cache dropped; and an lstat of every entry, cold (dentry and inode caches dropped)
and warm. Prints the times and ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.benchlib import load_average, machine, table
from benchmarks.build_images import ensure_images
from layerstore.units import size_arg
from liftoff.devstack.services import push_layout, start_registry
from snapshotter.fuse_control import FusedClient
from snapshotter.localnode import start_containerd, start_fused, start_snapshotter
from tests.remote.helpers import Snapshots

WORK = Path("/var/tmp/liftoff-bench/fuse-micro")
BIG = "opt/venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so"


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3")


def read_file(path: Path) -> float:
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(1 << 20)
        while f.readinto(buffer):
            pass
    return time.perf_counter() - started


def stat_all(root: Path) -> tuple[float, int]:
    started = time.perf_counter()
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lstat(os.path.join(dirpath, name))
            count += 1
    return time.perf_counter() - started, count


def mount(mounts, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    m = mounts[0]
    if m.type == "bind":
        subprocess.run(["mount", "--rbind", m.source, str(target)], check=True)
    else:
        subprocess.run(["mount", "-t", m.type, m.source, str(target), "-o", ",".join(m.options)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--readahead", type=size_arg(), default="128K", help="FUSE readahead of the liftoff views")
    args = parser.parse_args()
    layout = ensure_images()
    for stale in WORK.glob("mnt-*"):
        subprocess.run(["umount", "-l", str(stale)], check=False, capture_output=True)
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    registry = start_registry(WORK / "registry")
    store = f"file://{WORK / 'store'}"
    socket = WORK / "run" / "snapshotter.sock"
    snapshotter = containerd = fused = None
    mounted: list[Path] = []
    try:
        ref = push_layout(layout, "torch", registry.host, "bench/torch")
        subprocess.run(
            [sys.executable, "-m", "liftoff", "convert", ref, "--plain-http", "--store", store],
            check=True,
            capture_output=True,
        )
        fused = start_fused(
            WORK / "root" / "remote",
            ["--store", store, "--max-readahead", str(args.readahead)],
            workdir=WORK,
        )
        snapshotter = start_snapshotter(
            WORK / "root", socket, workdir=WORK, log_level="warning", extra_args=["--store", store, "--no-start-fused"]
        )
        containerd = start_containerd(WORK / "containerd", socket)
        containerd.ctr("image", "pull", "--plain-http", "--snapshotter", "overlayfs", ref)
        subprocess.run(
            [sys.executable, "-m", "liftoff", "pull", ref, "--address", containerd.address, "--plain-http"],
            check=True,
            capture_output=True,
        )
        roots = {}
        for name in ("overlayfs", "liftoff"):
            api = Snapshots(containerd.address, name)
            parent = _top_chain(containerd, name)
            mounts = api.prepare(f"micro-{name}", parent, {"containerd.io/gc.root": "bench"})
            target = WORK / f"mnt-{name}"
            mount(mounts, target)
            mounted.append(target)
            roots[name] = target
        read_file(roots["liftoff"] / BIG)  # fetch the file's chunks into liftoff's cache
        size = (roots["liftoff"] / BIG).stat().st_size
        results: dict[str, dict[str, list[float]]] = {n: {"read": [], "stat_cold": [], "stat_warm": []} for n in roots}
        count = 0
        for _ in range(args.runs):
            for name, root in roots.items():
                drop_caches()
                results[name]["read"].append(read_file(root / BIG))
                drop_caches()
                seconds, count = stat_all(root)
                results[name]["stat_cold"].append(seconds)
                results[name]["stat_warm"].append(stat_all(root)[0])
        rows = []
        for metric, label in (
            ("read", f"sequential read, {size / 1e6:.0f} MB, cached"),
            ("stat_cold", f"lstat of {count} entries, cold"),
            ("stat_warm", "lstat of every entry, warm"),
        ):
            ovl = sorted(results["overlayfs"][metric])[len(results["overlayfs"][metric]) // 2]
            lift = sorted(results["liftoff"][metric])[len(results["liftoff"][metric]) // 2]
            extra = f"{size / lift / 1e9:.2f} GB/s vs {size / ovl / 1e9:.2f} GB/s" if metric == "read" else ""
            rows.append([label, f"{ovl:.3f}", f"{lift:.3f}", f"{lift / ovl:.2f}x", extra])
        print(table(["measurement (median)", "overlayfs s", "liftoff s", "liftoff/overlayfs", ""], rows))
        print(
            f"machine: {machine()}; load average {load_average():.1f}; FUSE fetch stats: "
            f"{FusedClient(WORK / 'root' / 'remote' / 'fused.sock').status().fetch}".replace("\n", " ")
        )
    finally:
        for target in mounted:
            subprocess.run(["umount", "-l", str(target)], check=False)
        if containerd:
            containerd.stop()
        if snapshotter:
            snapshotter.stop()
        if fused:
            fused.stop()
        registry.stop()


def _top_chain(containerd, snapshotter: str) -> str:
    """The committed snapshot with no children: the image's top layer."""
    lines = containerd.ctr("snapshot", "--snapshotter", snapshotter, "ls").splitlines()[1:]
    keys = {line.split()[0] for line in lines}
    parents = {line.split()[1] for line in lines if len(line.split()) > 2}
    tops = sorted(keys - parents)
    return tops[0]


if __name__ == "__main__":
    main()
