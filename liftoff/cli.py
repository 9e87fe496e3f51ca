"""The `liftoff` command: one entry point, a subcommand per job.

Each component registers its own subcommands (a `register(subparsers)`
function in its `cli` module). Only the module that owns the command being
run is imported, so `liftoff convert` never pays for torch or ray; `--help`
imports them all. Components share the store options through
`layerstore.stores.options`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from layerstore import __version__
from layerstore.errors import LiftoffError

COMPONENTS = [
    "converter.cli",
    "snapshotter.cli",
    "weightstream.cli",
    "registry_proxy.cli",
    "serve_integration.compaction.cli",
    "liftoff.demo",
]
# Which component registers each top-level command.
COMMANDS = {
    "convert": "converter.cli",
    "replicate": "converter.cli",
    "ls": "converter.cli",
    "inspect": "converter.cli",
    "verify": "converter.cli",
    "rm": "converter.cli",
    "gc": "converter.cli",
    "snapshotter": "snapshotter.cli",
    "pull": "snapshotter.cli",
    "fused": "snapshotter.cli",
    "profile": "snapshotter.cli",
    "weights": "weightstream.cli",
    "compact": "serve_integration.compaction.cli",
    "demo": "liftoff.demo",
    "proxy": "registry_proxy.cli",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; with `argv`, only the component owning its command is loaded."""
    parser = argparse.ArgumentParser(prog="liftoff", description="Fast starts for AI serving replicas.")
    parser.add_argument("--version", action="version", version=f"liftoff {__version__}")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command = next((a for a in argv or [] if not a.startswith("-")), None)
    owner = COMMANDS.get(command) if command and "-h" not in (argv or []) else None
    for name in [owner] if owner else COMPONENTS:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the liftoff command line; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    passthrough: list[str] = []
    if "--" in argv:  # `liftoff profile IMAGE ... -- CMD ARGS`: what follows is a command, not options
        at = argv.index("--")
        argv, passthrough = argv[:at], argv[at + 1 :]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    args.passthrough = passthrough
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except LiftoffError as e:
        print(f"liftoff: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("liftoff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
