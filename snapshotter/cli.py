"""`liftoff snapshotter`: run the containerd snapshotter, or print its containerd configuration."""

from __future__ import annotations

import argparse
import logging

from layerstore.cli import add_store_options, store_options
from snapshotter.config import DEFAULT_CACHE_SIZE, DEFAULT_ROOT, DEFAULT_SOCKET


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "snapshotter",
        help="run the containerd snapshotter (proxy plugin) on a unix socket",
        description="Serve containerd's Snapshots API on a unix socket. `liftoff snapshotter config` prints the "
        "containerd configuration that uses it.",
    )
    p.add_argument("--root", default=DEFAULT_ROOT, help=f"state directory: metadata and snapshots (default {DEFAULT_ROOT})")
    p.add_argument("--socket", default=DEFAULT_SOCKET, help=f"unix socket to serve on (default {DEFAULT_SOCKET})")
    p.add_argument("--metrics", metavar="ADDR", help="serve Prometheus metrics on HOST:PORT or :PORT")
    add_store_options(p, required=False)
    p.add_argument("--cache-size", default=DEFAULT_CACHE_SIZE, help=f"chunk cache cap (default {DEFAULT_CACHE_SIZE})")
    p.add_argument("--fuse-readahead", default="128K", help="readahead of the FUSE views, for a FUSE daemon it starts")
    p.add_argument(
        "--no-start-fused",
        action="store_true",
        help="do not start the FUSE daemon if it is not running (it has its own systemd unit)",
    )
    p.add_argument(
        "--log-level",
        dest="snapshotter_log_level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level of the service (default info)",
    )
    p.set_defaults(run=run_serve)
    actions = p.add_subparsers(dest="snapshotter_action", metavar="[config]", title="actions (none: serve)")
    c = actions.add_parser("config", help="print the containerd config snippet (proxy plugin and CRI snapshotter)")
    c.add_argument("--socket", default=DEFAULT_SOCKET, help=f"the snapshotter's socket (default {DEFAULT_SOCKET})")
    c.set_defaults(run=run_config)
    register_pull(subparsers)

    f = subparsers.add_parser(
        "fused",
        help="run the FUSE daemon that serves remote layers (started by the snapshotter if not running)",
        description="Serve merged read-only views of remote layers through FUSE, fetching chunks lazily.",
    )
    f.add_argument("--root", required=True, help="state directory (the snapshotter uses ROOT/remote of its own root)")
    add_store_options(f)
    f.add_argument("--cache-size", default=DEFAULT_CACHE_SIZE, help=f"chunk cache cap (default {DEFAULT_CACHE_SIZE})")
    f.add_argument(
        "--backend",
        choices=["kernel", "fusepy"],
        default="kernel",
        help="FUSE implementation: our kernel-protocol server (default) or fusepy/libfuse2 (for comparison)",
    )
    f.add_argument("--max-readahead", default="128K", help="FUSE readahead the kernel may do per file (default 128K)")
    f.set_defaults(run=run_fused)


def _bytes(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)


def _store_argv(args: argparse.Namespace) -> list[str]:
    argv = [a for url in args.store or [] for a in ("--store", url)]
    for flag, value in (("--endpoint-url", args.endpoint_url), ("--region", args.region)):
        if value:
            argv += [flag, value]
    return argv + (["--path-style"] if args.path_style else [])


def register_pull(subparsers) -> None:
    from snapshotter.containerd_api import DEFAULT_ADDRESS

    p = subparsers.add_parser(
        "pull",
        help="pull an image into containerd through the snapshotter (lazily where it serves layers remotely)",
        description="Pull IMAGE into containerd over its gRPC API the way its pull-time unpacker does: layers the "
        "snapshotter serves remotely are never downloaded. Then `ctr run --snapshotter liftoff IMAGE ID` runs it.",
    )
    p.add_argument("image", metavar="IMAGE", help="image reference: host[:port]/repository[:tag][@sha256:digest]")
    p.add_argument("--address", default=DEFAULT_ADDRESS, help=f"containerd's socket (default {DEFAULT_ADDRESS})")
    p.add_argument("--snapshotter", default="liftoff", help="containerd snapshotter to unpack with (default liftoff)")
    p.add_argument("--namespace", default="default", help="containerd namespace (default default; kubelet uses k8s.io)")
    p.add_argument("--plain-http", action="store_true", help="talk to the registry over plain HTTP")
    p.add_argument("--docker-config", metavar="FILE", help="registry credentials (default ~/.docker/config.json)")
    p.add_argument("--platform", help="os/arch[/variant] to pick from an index (default: this machine's)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run_pull)


def run_pull(args: argparse.Namespace) -> int:
    from snapshotter.pull import run_cli

    return run_cli(args)


def run_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from layerstore.stores import open_stores
    from snapshotter.remote import RemoteLayers, RemoteLayout, ensure_fused
    from snapshotter.server import serve

    logging.getLogger().setLevel(args.snapshotter_log_level.upper())
    if not args.store:
        logging.getLogger(__name__).warning("no --store given: every layer is pulled as an ordinary layer")
        return serve(args.root, args.socket, args.metrics)
    remote_root = Path(args.root).absolute() / "remote"
    if args.no_start_fused:
        from snapshotter.fuse_control import FusedClient

        fused = FusedClient(remote_root / "fused.sock")
    else:
        fused = ensure_fused(
            remote_root, [*_store_argv(args), "--max-readahead", args.fuse_readahead], args.cache_size, args.snapshotter_log_level
        )
    remote = RemoteLayers(remote_root, open_stores(args.store, **store_options(args)), fused)
    return serve(
        args.root,
        args.socket,
        args.metrics,
        prepare_hooks=[remote.prepare_hook],
        layout=RemoteLayout(args.root, remote),
        removed_hooks=[remote.removed_hook],
    )


def run_fused(args: argparse.Namespace) -> int:
    from layerstore.stores import open_stores
    from snapshotter.fuse_daemon import run

    return run(
        args.root,
        open_stores(args.store, **store_options(args)),
        _bytes(args.cache_size),
        backend=args.backend,
        max_readahead=_bytes(args.max_readahead),
    )


def run_config(args: argparse.Namespace) -> int:
    from snapshotter.config import containerd_snippet

    print(containerd_snippet(args.socket), end="")
    return 0
