"""`liftoff snapshotter`: run the containerd snapshotter, or print its containerd configuration."""

from __future__ import annotations

import argparse
import logging

from layerstore.stores.options import add_store_options, store_options
from layerstore.units import size_arg
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
    p.add_argument(
        "--cache-size", type=size_arg(), default=DEFAULT_CACHE_SIZE, help=f"chunk cache cap (default {DEFAULT_CACHE_SIZE})"
    )
    p.add_argument(
        "--fuse-readahead", type=size_arg(), default="128K", help="readahead of the FUSE views, for a FUSE daemon it starts"
    )
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
    f.add_argument(
        "--cache-size", type=size_arg(), default=DEFAULT_CACHE_SIZE, help=f"chunk cache cap (default {DEFAULT_CACHE_SIZE})"
    )
    f.add_argument(
        "--max-readahead", type=size_arg(), default="128K", help="FUSE readahead the kernel may do per file (default 128K)"
    )
    f.add_argument("--prefetch-threads", type=int, default=16, help="concurrent fetches of a startup profile (default 16)")
    f.add_argument(
        "--fetch-retry-seconds",
        type=float,
        default=30.0,
        help="how long a read keeps retrying a store that fails (unreachable, corrupt data) before EIO",
    )
    f.add_argument(
        "--fill-rate",
        type=size_arg(),
        default="0",
        help="after the profile, fetch the rest of each image at this many bytes/s in the background (e.g. 50M; default 0: off)",
    )
    f.add_argument(
        "--learn-seconds",
        type=float,
        default=0.0,
        help="record the first N seconds of reads of every new view as a trace for `liftoff profile --merge` (default 0: off)",
    )
    f.add_argument(
        "--fd-holder",
        metavar="SOCKET",
        help="keep the views' FUSE connections in the `liftoff fdholder` at SOCKET, so that they outlive this daemon "
        "(Kubernetes); under systemd with FileDescriptorStoreMax= its fd store is used without this",
    )
    f.add_argument(
        "--takeover",
        action="store_true",
        help="take the views over from the daemon serving ROOT (an upgrade: it hands over its connections and exits)",
    )
    f.add_argument(
        "--no-resend",
        dest="resend",
        action="store_false",
        help="do not ask the kernel (6.9+) to resend the requests a dead daemon left unanswered (for tests of older kernels)",
    )
    f.add_argument(
        "--passthrough",
        dest="fuse_passthrough",
        action="store_true",
        default=False,
        help="where the kernel offers FUSE passthrough (6.9+), let it read files whose bytes are all local from whole "
        "local copies (off by default: measured, it costs more fused CPU per start than it saves; benchmarks/RESULTS.md)",
    )
    f.add_argument(
        "--no-passthrough",
        dest="fuse_passthrough",
        action="store_false",
        help="serve every read through the daemon (the default; as on kernels before 6.9)",
    )
    f.add_argument(
        "--erofs",
        dest="erofs",
        action="store_true",
        default=False,
        help="serve each view as an EROFS image (Linux 6.12+: file-backed EROFS) whose file bytes come from a FUSE "
        "blob: the kernel answers lookups, attributes, listings and xattrs itself; older kernels fall back to FUSE views",
    )
    f.add_argument(
        "--no-page-fill",
        dest="page_fill",
        action="store_false",
        default=True,
        help="do not put the bytes of the startup profile's files in the kernel's page cache ahead of a start "
        "(FUSE_NOTIFY_STORE); its reads then each ask the daemon",
    )
    f.add_argument(
        "--no-erofs",
        dest="erofs",
        action="store_false",
        help="serve each view's whole tree through FUSE (the default)",
    )
    f.add_argument(
        "--metrics-address",
        metavar="ADDR",
        help="serve Prometheus metrics (/metrics) and a health check (/healthz: 200 once the views are restored and "
        "the control socket answers) over HTTP on HOST:PORT or :PORT (default: off)",
    )
    f.set_defaults(run=run_fused)
    h = subparsers.add_parser(
        "fdholder",
        help="keep the FUSE daemon's connections (its /dev/fuse descriptors) while it restarts",
        description="Hold the FUSE daemon's /dev/fuse descriptors on a unix socket, so that a crash, restart or upgrade "
        "of `liftoff fused --fd-holder SOCKET` never ends running containers' mounts. It does nothing else.",
    )
    h.add_argument("--socket", required=True, help="unix socket to serve on (0600)")
    h.set_defaults(run=run_fdholder)
    register_profile(subparsers)


def register_profile(subparsers) -> None:
    p = subparsers.add_parser(
        "profile",
        help="record an image's startup profile (the chunks a real start reads) and store it with the image",
        description="Start IMAGE once lazily while the FUSE daemon records its reads, then store the chunks it read, "
        "in order, with the image record: every later start prefetches them. With --merge, fold traces of real "
        "starts (fused --learn-seconds) into the stored profile instead.",
    )
    p.add_argument("image", help="registry reference of a converted image")
    p.epilog = "Put the command to run after --, e.g. -- python3 -c 'import torch' (default: the image's own command)."
    add_store_options(p)
    p.add_argument("--plain-http", action="store_true", help="talk HTTP to the registry")
    p.add_argument("--docker-config", help="docker config file with credentials")
    p.add_argument("--platform", help="os/arch of a multi-platform image (default: this machine's)")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--until-line", metavar="TEXT", help="stop once the start prints a line containing TEXT")
    stop.add_argument("--seconds", type=float, help="stop after N seconds")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds (default 600)")
    p.add_argument("--net-host", action="store_true", help="run the start in the host's network (to reach its services)")
    p.add_argument(
        "--address",
        help="containerd socket to use (its liftoff snapshotter must use the same store); "
        "default: start a private containerd, snapshotter and FUSE daemon",
    )
    p.add_argument(
        "--fused-socket",
        default="/var/lib/liftoff/snapshotter/remote/fused.sock",
        help="the FUSE daemon's control socket, with --address",
    )
    p.add_argument("--merge", nargs="+", metavar="TRACE", help="fold these trace files into the stored profile")
    p.add_argument("--show", action="store_true", help="print the stored profile and exit")
    p.add_argument(
        "--no-relayout", action="store_true", help="keep the chunk layout (the profile lists the original chunks the start read)"
    )
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    p.set_defaults(run=run_profile)


def run_profile(args: argparse.Namespace) -> int:
    import json

    from layerstore.catalog import find_image, set_profile
    from layerstore.errors import LiftoffError
    from layerstore.stores import StoreChain, open_stores
    from snapshotter.profile import merge, summarize

    stores = open_stores(args.store, **store_options(args))
    command = args.passthrough
    if args.show or args.merge:
        digest, record = find_image(StoreChain(stores), args.image)
        profile = getattr(record, "profile", None)
        if args.merge:
            from pathlib import Path

            traces = [json.loads(Path(path).read_text()) for path in args.merge]
            profile = merge(profile, traces)
            set_profile(stores, digest, profile)
        if profile is None:
            raise LiftoffError(f"{args.image} has no startup profile: record one with liftoff profile IMAGE --store URL")
    else:
        from snapshotter.record import record_profile

        profile = record_profile(
            args.image,
            stores,
            store_args=_store_argv(args),
            command=command,
            until_line=args.until_line,
            seconds=args.seconds,
            plain_http=args.plain_http,
            docker_config=args.docker_config,
            platform=args.platform,
            address=args.address,
            fused_socket=args.fused_socket,
            timeout=args.timeout,
            relayout=not args.no_relayout,
            net_host=args.net_host,
        )
    print(json.dumps(profile) if args.json else f"{args.image}: {summarize(profile)}")
    return 0


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
    p.add_argument("--address", help=f"containerd's socket (default: $CONTAINERD_ADDRESS as for ctr, else {DEFAULT_ADDRESS})")
    p.add_argument("--snapshotter", default="liftoff", help="containerd snapshotter to unpack with (default liftoff)")
    p.add_argument(
        "--namespace",
        help="containerd namespace (default: $CONTAINERD_NAMESPACE as for ctr and nerdctl, else default; kubelet uses k8s.io)",
    )
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
        from snapshotter.fuse_control import SNAPSHOTTER_NEEDS, FusedClient

        fused = FusedClient(remote_root / "fused.sock", needs=SNAPSHOTTER_NEEDS)  # checked at its first use
    else:
        fused = ensure_fused(
            remote_root,
            [*_store_argv(args), "--max-readahead", str(args.fuse_readahead)],
            str(args.cache_size),
            args.snapshotter_log_level,
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


def run_fdholder(args: argparse.Namespace) -> int:
    from snapshotter.fdholder import run

    return run(args)


def run_fused(args: argparse.Namespace) -> int:
    from layerstore.stores import open_stores
    from snapshotter.fused.daemon import run
    from snapshotter.fused.fdstore import open_fd_store

    return run(
        args.root,
        open_stores(args.store, **store_options(args)),
        args.cache_size,
        fd_store=open_fd_store(args.fd_holder),
        takeover=args.takeover,
        resend=args.resend,
        passthrough=args.fuse_passthrough,
        erofs=args.erofs,
        page_fill=args.page_fill,
        max_readahead=args.max_readahead,
        prefetch_threads=args.prefetch_threads,
        fill_rate=float(args.fill_rate),
        learn_seconds=args.learn_seconds,
        fetch_retry_seconds=args.fetch_retry_seconds,
        metrics_address=args.metrics_address,
    )


def run_config(args: argparse.Namespace) -> int:
    from snapshotter.config import containerd_snippet

    print(containerd_snippet(args.socket), end="")
    return 0
