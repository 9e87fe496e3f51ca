"""containerd and the liftoff node daemons as children on this machine.

`liftoff profile` (snapshotter/record.py) runs its start of the image in a private containerd
with its own snapshotter; the demo, the tests and the benchmarks start theirs the same way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from layerstore.errors import LiftoffError
from layerstore.procs import Service, spawn, wait_for_socket


def start_snapshotter(
    root: str | os.PathLike[str],
    socket_path: str | os.PathLike[str],
    workdir: str | os.PathLike[str] | None = None,
    metrics: str | None = None,
    log_level: str = "debug",
    timeout: float = 30.0,
    extra_args: list[str] | None = None,
) -> Service:
    """Start `liftoff snapshotter --root ROOT --socket SOCKET [EXTRA_ARGS]` as a child; returns once it listens.

    The log goes to WORKDIR/snapshotter.log (WORKDIR defaults to ROOT's parent).
    `extra` holds "root" and "socket".
    """
    root, socket_path = Path(root).absolute(), Path(socket_path).absolute()
    argv = [sys.executable, "-m", "liftoff", "snapshotter", "--root", str(root), "--socket", str(socket_path)]
    argv += ["--log-level", log_level] + (["--metrics", metrics] if metrics else []) + list(extra_args or [])
    service = spawn("snapshotter", argv, Path(workdir) if workdir else root.parent)
    service.extra.update(root=root, socket=socket_path)
    wait_for_socket(socket_path, service, timeout)
    return service


def start_fused(
    root: str | os.PathLike[str],
    args: list[str],
    workdir: str | os.PathLike[str] | None = None,
    log_level: str = "info",
    timeout: float = 30.0,
) -> Service:
    """Start `liftoff fused --root ROOT ARGS` (the FUSE daemon) as a child; returns once it answers.

    The snapshotter of ROOT's parent then attaches to it (`--no-start-fused`)."""
    root = Path(root).absolute()
    argv = [sys.executable, "-m", "liftoff", "--log-level", log_level, "fused", "--root", str(root), *args]
    service = spawn("fused", argv, Path(workdir) if workdir else root.parent)
    wait_for_socket(root / "fused.sock", service, timeout)
    return service


@dataclass
class Containerd:
    """Debian's containerd as a child with a private root, state and socket; `ctr()` talks to it."""

    service: Service
    address: str
    root: Path
    state: Path
    config_path: Path

    def ctr(self, *args: str, namespace: str = "default", check: bool = True, timeout: float = 300) -> str:
        """Run `ctr --address ADDRESS --namespace NS ARGS`; returns stdout (raises on failure when `check`)."""
        argv = ["ctr", "--address", self.address, "--namespace", namespace, *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise LiftoffError(f"ctr {' '.join(args)} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def stop(self) -> None:
        self.service.stop()

    def log(self) -> str:
        return self.service.log()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def containerd_config(
    workdir: Path, snapshotter_socket: str | os.PathLike[str] | None, plugin_name: str = "liftoff", cri: bool = False
) -> str:
    """A version 2 containerd config: private root/state/sockets, a snapshot proxy plugin, CRI off unless `cri`.

    With `cri`, the CRI plugin unpacks with the proxy plugin (overlayfs without one), keeps containerd's default
    `disable_snapshot_annotations = true`, and reads CNI from private empty directories, so it starts offline.
    """
    disabled = ["io.containerd.grpc.v1.cri"] if not cri else []
    disabled += [f"io.containerd.snapshotter.v1.{name}" for name in ("btrfs", "zfs", "devmapper", "aufs")]
    quoted = ", ".join(f'"{name}"' for name in disabled)
    text = (
        "version = 2\n"
        f'root = "{workdir / "root"}"\n'
        f'state = "{workdir / "state"}"\n'
        f"disabled_plugins = [{quoted}]\n"
        f'[grpc]\n  address = "{workdir / "containerd.sock"}"\n'
        f'[ttrpc]\n  address = "{workdir / "containerd.sock.ttrpc"}"\n'
        '[debug]\n  level = "info"\n'
    )
    if cri:
        snapshotter = plugin_name if snapshotter_socket is not None else "overlayfs"
        section = '[plugins."io.containerd.grpc.v1.cri"'
        text += (
            f"{section}.containerd]\n"
            f'  snapshotter = "{snapshotter}"\n'
            "  disable_snapshot_annotations = true\n"
            f"{section}.cni]\n"
            f'  bin_dir = "{workdir / "cni" / "bin"}"\n'
            f'  conf_dir = "{workdir / "cni" / "net.d"}"\n'
        )
    if snapshotter_socket is not None:
        text += f'[proxy_plugins]\n  [proxy_plugins.{plugin_name}]\n    type = "snapshot"\n    address = "{snapshotter_socket}"\n'
    return text


def start_containerd(
    workdir: str | os.PathLike[str],
    snapshotter_socket: str | os.PathLike[str] | None = None,
    plugin_name: str = "liftoff",
    timeout: float = 30.0,
    cri: bool = False,
) -> Containerd:
    """Start Debian's containerd with everything under `workdir` and `plugin_name` proxying to the snapshotter socket.

    Start the snapshotter first: containerd does not list images of a snapshotter that was down when it started.
    `cri` turns on the CRI plugin (namespace k8s.io) unpacking with that snapshotter (see containerd_config).
    """
    binary = shutil.which("containerd")
    if not binary or not shutil.which("ctr") or not shutil.which("runc"):
        raise LiftoffError("containerd, ctr and runc are needed (apt-get install containerd runc)")
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "containerd.toml"
    if cri:
        for directory in ("bin", "net.d"):
            (workdir / "cni" / directory).mkdir(parents=True, exist_ok=True)
    config_path.write_text(containerd_config(workdir, snapshotter_socket, plugin_name, cri))
    address = workdir / "containerd.sock"
    service = spawn("containerd", [binary, "--config", str(config_path)], workdir)
    wait_for_socket(address, service, timeout)
    return Containerd(service, str(address), workdir / "root", workdir / "state", config_path)
