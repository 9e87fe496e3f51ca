"""`liftoff snapshotter`: run the containerd snapshotter, or print its containerd configuration."""

from __future__ import annotations

import argparse
import logging

from snapshotter.config import DEFAULT_ROOT, DEFAULT_SOCKET


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


def run_serve(args: argparse.Namespace) -> int:
    from snapshotter.server import serve

    logging.getLogger().setLevel(args.snapshotter_log_level.upper())
    return serve(args.root, args.socket, args.metrics)


def run_config(args: argparse.Namespace) -> int:
    from snapshotter.config import containerd_snippet

    print(containerd_snippet(args.socket), end="")
    return 0
