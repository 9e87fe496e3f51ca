#!/usr/bin/env python3
"""Build the benchmark images as an OCI layout (cached; rebuilt only when missing).

    scripts/bench build_images [--dir /var/tmp/liftoff-bench/images]

Tags in the layout:
  python: Debian bookworm minbase (debootstrap) + python3          2 layers
  torch:  python + a venv with numpy, + torch==2.13.0 (CPU)        4 layers
The realistic image of the benchmarks: ~350 MB gzip, ~1.1 GB unpacked, ~30k files.

    scripts/bench build_images --vllm [--dir /var/tmp/liftoff-bench/vllm-image]

The seed-scale image (benchmarks/seedscale.py), its own layout with the tag `vllm`: minbase, + python3 and
python3-venv, + a venv with `pip install vllm==0.33.0` (torch 2.14 with its CUDA wheels; ~4.6 GB gzip,
~10 GB, ~110k files), 3 layers. Its wheels are downloaded once on the host into /var/tmp/liftoff-wheels/vllm
(`pip download --only-binary=:all:`, the host's Python is the image's: CPython 3.11 on glibc 2.36) and
installed in the chroot with `--no-index --find-links`.
Layers are made with umoci (unpack, change the rootfs, repack: one layer per step). Before each repack the new
files' mtimes are truncated to whole seconds, as Docker's and containerd's tar writers do: umoci's (Go's archive/tar
with no format chosen) rounds them instead, and a source file rounded up no longer matches the mtime its .pyc
records (about half of what pip compiled), so every run would compile those modules again.
Needs root, debootstrap, umoci, and the Debian mirror configured for apt on this machine.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_DIR = Path("/var/tmp/liftoff-bench/images")
VLLM_DIR = Path("/var/tmp/liftoff-bench/vllm-image")
VLLM_WHEELS = Path("/var/tmp/liftoff-wheels/vllm")
VLLM_REQUIREMENT = "vllm==0.33.0"
SUITE = "bookworm"


def run(*argv: str, **kw) -> None:
    print("+", " ".join(argv), file=sys.stderr)
    subprocess.run(argv, check=True, **kw)


def debian_mirror() -> str:
    """The Debian mirror apt uses on this machine (deb822 or one-line sources)."""
    for path in ["/etc/apt/sources.list.d/debian.sources", *glob.glob("/etc/apt/sources.list.d/*.sources")]:
        if os.path.exists(path):
            match = re.search(r"^URIs:\s*(\S+)", Path(path).read_text(), re.M)
            if match and "security" not in match.group(1):
                return match.group(1)
    for path in ["/etc/apt/sources.list", *glob.glob("/etc/apt/sources.list.d/*.list")]:
        if os.path.exists(path):
            match = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S+\s+main", Path(path).read_text(), re.M)
            if match:
                return match.group(1)
    raise SystemExit("no Debian mirror found in /etc/apt/sources.list*")


def truncate_mtimes(rootfs: Path) -> None:
    """Truncate sub-second mtimes under `rootfs` to whole seconds (see the module docstring); files unpacked from
    a layer already have whole seconds, so only this step's files change."""
    for directory, dirs, files in os.walk(rootfs):
        for name in (*dirs, *files, ""):
            path = os.path.join(directory, name) if name else directory
            st = os.lstat(path)
            extra = st.st_mtime_ns % 1_000_000_000
            if extra:
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - extra), follow_symlinks=False)


def repack(image: str, bundle: Path) -> None:
    """A new layer from what changed in the bundle's rootfs, with mtimes as Docker would store them."""
    truncate_mtimes(bundle / "rootfs")
    run("umoci", "repack", "--refresh-bundle", "--image", image, str(bundle))


class Chroot:
    """proc/sys/dev (and a read-only wheel directory) mounted into a rootfs, unmounted on exit.

    Nothing mounted ends up in a layer: umoci repacks after the mounts are gone.
    """

    def __init__(self, root: Path, wheels: Path | None = None) -> None:
        self.root = root
        self.wheels = wheels
        self.mounts = ["proc", "sys", "dev"] + (["tmp/wheels"] if wheels else [])

    def __enter__(self):
        for name in self.mounts:
            target = self.root / name
            target.mkdir(exist_ok=True)
            if name == "proc":
                run("mount", "-t", "proc", "proc", str(target))
            elif name == "tmp/wheels":
                run("mount", "--bind", "-o", "ro", str(self.wheels), str(target))
            else:
                run("mount", "--rbind", f"/{name}", str(target))
                run("mount", "--make-rslave", str(target))
        shutil.copy("/etc/resolv.conf", self.root / "etc/resolv.conf")
        return self

    def __call__(self, *argv: str) -> None:
        run(
            "chroot",
            str(self.root),
            *argv,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C", "HOME": "/root"},
        )

    def __exit__(self, *exc) -> None:
        for name in reversed(self.mounts):
            subprocess.run(["umount", "-R", "-l", str(self.root / name)], check=False)
        if self.wheels:
            (self.root / "tmp/wheels").rmdir()
        (self.root / "etc/resolv.conf").write_text("")


def clean_apt(root: Path) -> None:
    for pattern in ("var/lib/apt/lists/*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb", "var/log/*.log"):
        for path in glob.glob(str(root / pattern)):
            if os.path.isfile(path):
                os.remove(path)


def download_wheels(directory: Path, *requirements: str) -> None:
    """Wheels for the image's Python (CPython 3.11, x86_64 Linux), fetched on the host with its pip configuration."""
    platforms = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64") for a in ("--platform", p)]
    run(
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--only-binary=:all:",
        "--python-version",
        "3.11",
        *platforms,
        "-d",
        str(directory),
        *requirements,
    )


def build(out: Path) -> None:
    wheels = Path(tempfile.mkdtemp(prefix="liftoff-wheels-"))
    # Download on the host with its pip configuration; install offline inside the image.
    download_wheels(wheels, "torch==2.13.0", "numpy==2.3.5")
    layout = out.with_suffix(".building")
    shutil.rmtree(layout, ignore_errors=True)
    bundle = Path(tempfile.mkdtemp(prefix="liftoff-bundle-", dir="/var/tmp"))
    try:
        run("umoci", "init", "--layout", str(layout))
        run("umoci", "new", "--image", f"{layout}:torch")
        shutil.rmtree(bundle)
        run("umoci", "unpack", "--image", f"{layout}:torch", str(bundle))
        rootfs = bundle / "rootfs"
        run("debootstrap", "--variant=minbase", SUITE, str(rootfs), debian_mirror())
        clean_apt(rootfs)
        repack(f"{layout}:torch", bundle)
        with Chroot(rootfs) as chroot:
            chroot("apt-get", "update", "-qq")
            chroot("apt-get", "install", "-y", "-qq", "--no-install-recommends", "python3", "python3-venv")
        clean_apt(rootfs)
        repack(f"{layout}:torch", bundle)
        run("umoci", "tag", "--image", f"{layout}:torch", "python")
        with Chroot(rootfs, wheels) as chroot:
            chroot("python3", "-m", "venv", "/opt/venv")
            numpy_wheel = "/tmp/wheels/" + next(p.name for p in wheels.glob("numpy-*.whl"))
            chroot("/opt/venv/bin/pip", "install", "-q", "--no-index", "--no-compile", numpy_wheel)
        repack(f"{layout}:torch", bundle)
        with Chroot(rootfs, wheels) as chroot:
            chroot("/opt/venv/bin/pip", "install", "-q", "--no-index", "--find-links", "/tmp/wheels", "torch==2.13.0")
        repack(f"{layout}:torch", bundle)
        env = ["--config.env", "PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
        for tag in ("python", "torch"):
            run("umoci", "config", "--image", f"{layout}:{tag}", *env, "--config.cmd", "python3")
        run("umoci", "gc", "--layout", str(layout))
        layout.rename(out)
    finally:
        subprocess.run(["umount", "-R", "-l", str(bundle / "rootfs/proc")], check=False, capture_output=True)
        shutil.rmtree(bundle, ignore_errors=True)
        shutil.rmtree(wheels, ignore_errors=True)


def build_vllm(out: Path, wheels: Path = VLLM_WHEELS) -> None:
    """The seed-scale layout: minbase, + python3/python3-venv, + a venv with vLLM (one layer per step)."""
    if not any(wheels.glob("vllm-*.whl")):
        wheels.mkdir(parents=True, exist_ok=True)
        run(sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(wheels), VLLM_REQUIREMENT)
    layout = out.with_suffix(".building")
    shutil.rmtree(layout, ignore_errors=True)
    bundle = Path(tempfile.mkdtemp(prefix="liftoff-bundle-", dir="/var/tmp"))
    image = f"{layout}:vllm"
    try:
        run("umoci", "init", "--layout", str(layout))
        run("umoci", "new", "--image", image)
        shutil.rmtree(bundle)
        run("umoci", "unpack", "--image", image, str(bundle))
        rootfs = bundle / "rootfs"
        run("debootstrap", "--variant=minbase", SUITE, str(rootfs), debian_mirror())
        clean_apt(rootfs)
        repack(image, bundle)
        with Chroot(rootfs) as chroot:
            chroot("apt-get", "update", "-qq")
            chroot("apt-get", "install", "-y", "-qq", "--no-install-recommends", "python3", "python3-venv")
        clean_apt(rootfs)
        repack(image, bundle)
        with Chroot(rootfs, wheels) as chroot:
            chroot("python3", "-m", "venv", "/opt/venv")
            chroot("/opt/venv/bin/pip", "install", "-q", "--no-index", "--find-links", "/tmp/wheels", VLLM_REQUIREMENT)
            for cache in (rootfs / "root/.cache").glob("*"):
                shutil.rmtree(cache, ignore_errors=True)
        repack(image, bundle)
        env = ["--config.env", "PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
        run("umoci", "config", "--image", image, *env, "--config.cmd", "python3")
        run("umoci", "gc", "--layout", str(layout))
        layout.rename(out)
    finally:
        subprocess.run(["umount", "-R", "-l", str(bundle / "rootfs/proc")], check=False, capture_output=True)
        shutil.rmtree(bundle, ignore_errors=True)


def ensure_vllm_image(directory: Path = VLLM_DIR) -> Path:
    """The OCI layout with the tag `vllm`, built if missing."""
    if not (directory / "index.json").exists():
        directory.parent.mkdir(parents=True, exist_ok=True)
        build_vllm(directory)
    return directory


def ensure_images(directory: Path = DEFAULT_DIR) -> Path:
    """The OCI layout with tags `python` and `torch`, built if missing."""
    if not (directory / "index.json").exists():
        directory.parent.mkdir(parents=True, exist_ok=True)
        build(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help=f"default {DEFAULT_DIR}, or {VLLM_DIR} with --vllm")
    parser.add_argument("--vllm", action="store_true", help="build the seed-scale vLLM image instead")
    args = parser.parse_args()
    if args.vllm:
        print(ensure_vllm_image(args.dir or VLLM_DIR))
    else:
        print(ensure_images(args.dir or DEFAULT_DIR))


if __name__ == "__main__":
    main()
