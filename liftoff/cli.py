"""The `liftoff` command: one entry point, a subcommand per job.

Each component registers its own subcommands (a `register(subparsers)`
function in its `cli` module). Only the module that owns the command being
run is imported, so `liftoff convert` never pays for torch or ray; `--help`
imports them all. Components share the store options through
`layerstore.stores.options`. Options also come from one configuration file
and the environment (`liftoff/config.py`); errors end with the exit codes
of `EXIT_CODES`, and as a JSON object on stdout under `--json`.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import logging
import os
import sys
import traceback

from layerstore import __version__
from layerstore.errors import EXIT_USAGE, LiftoffError
from liftoff import config

COMPONENTS = [
    "converter.cli",
    "snapshotter.cli",
    "weightstream.cli",
    "registry_proxy.cli",
    "serve_integration.compaction.cli",
    "liftoff.demo",
    "liftoff.node",
    "liftoff.config",
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
    "fdholder": "snapshotter.cli",
    "profile": "snapshotter.cli",
    "weights": "weightstream.cli",
    "compact": "serve_integration.compaction.cli",
    "demo": "liftoff.demo",
    "proxy": "registry_proxy.cli",
    "node": "liftoff.node",
    "config": "liftoff.config",
}
EXIT_CODES = """\
exit codes:
  0  ok
  1  error (one line on stderr: what failed and what to do)
  2  usage: a bad option, argument or configuration file setting
  3  busy: someone else holds what this needs (gc giving way to a writer, a lease); nothing changed, retry later
  4  verification failed: stored data is corrupt or missing (liftoff verify)
  130 interrupted
With --json, a failure also prints {"error": {"code": ..., "message": ..., "exit": N}} on stdout.

configuration: --config FILE, else $LIFTOFF_CONFIG, else /etc/liftoff/config.toml if it exists; a
[COMMAND] table per command (keys: its long options), then LIFTOFF_<COMMAND>_<OPTION> variables,
then flags. `liftoff config show COMMAND` prints the effective settings and their sources."""
GLOBAL_VALUE_OPTIONS = ("--log-level", "--log-format", "--config")

_json_errors = False  # --json is on the command line: errors are also a JSON object on stdout


def error_object(code: str, message: str, exit_code: int, **details: object) -> dict:
    """The --json form of a failure."""
    return {"error": {"code": code, "message": message, "exit": exit_code, **details}}


def _print_json_error(code: str, message: str, exit_code: int, **details: object) -> None:
    sys.stdout.write(json.dumps(error_object(code, message, exit_code, **details), default=str) + "\n")
    sys.stdout.flush()


class LiftoffParser(argparse.ArgumentParser):
    """An ArgumentParser (and, through parser_class, every subparser) that takes its defaults from the
    active configuration (liftoff/config.py) when it parses, and reports usage errors as JSON under --json."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        settings = config.current()
        if settings is not None and not getattr(self, "_liftoff_settings_applied", False):
            self._liftoff_settings_applied = True
            settings.apply(self, tuple(self.prog.split()[1:]))
        return super().parse_known_args(args, namespace)

    def error(self, message: str):  # type: ignore[override]
        if _json_errors:
            _print_json_error("usage", f"{self.prog}: {message}", EXIT_USAGE)
        super().error(message)


def _command_word(argv: list[str]) -> str | None:
    """The top-level command in `argv`: its first word that is no global option or a global option's value."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in GLOBAL_VALUE_OPTIONS:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; with `argv`, only the component owning its command is loaded."""
    parser = LiftoffParser(
        prog="liftoff",
        description="Fast starts for AI serving replicas.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"liftoff {__version__}")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="log lines on stderr as text (default) or as JSON objects, one a line (time, level, logger, message, ...)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"configuration file (default ${config.PATH_ENV}, else {config.DEFAULT_PATH} if it exists)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command = _command_word(argv or [])
    owner = COMMANDS.get(command) if command and "-h" not in (argv or []) and "--help" not in (argv or []) else None
    for name in [owner] if owner else COMPONENTS:
        importlib.import_module(name).register(subparsers)
    return parser


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, RFC 3339), level, logger, message, pid, thread; exception and stack if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
            "thread": record.threadName,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str, log_format: str = "text") -> None:
    """Log to stderr at `level`, as text or (log_format "json") JSON lines; every daemon logs through this."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def _fail(error: BaseException, code: str, exit_code: int, details: dict | None = None) -> int:
    message = str(error) or type(error).__name__
    if _json_errors:
        _print_json_error(code, message, exit_code, **(details or {}))
    print(f"liftoff: error: {message}", file=sys.stderr)
    return exit_code


def main(argv: list[str] | None = None) -> int:
    """Run the liftoff command line; returns the exit code (see EXIT_CODES)."""
    global _json_errors
    argv = sys.argv[1:] if argv is None else argv
    passthrough: list[str] = []
    if "--" in argv:  # `liftoff profile IMAGE ... -- CMD ARGS`: what follows is a command, not options
        at = argv.index("--")
        argv, passthrough = argv[:at], argv[at + 1 :]
    _json_errors = "--json" in argv
    try:
        settings = config.Settings.load(config.config_path_argument(argv, GLOBAL_VALUE_OPTIONS), os.environ, set(COMMANDS))
        parser = build_parser(argv)
        with config.active(settings):
            args = parser.parse_args(argv)
        settings.resolve(args)
    except LiftoffError as e:
        return _fail(e, e.error_code, e.exit_code, getattr(e, "details", None))
    args.passthrough = passthrough
    args.settings = settings
    setup_logging(args.log_level, getattr(args, "log_format", "text"))
    try:
        return int(args.run(args) or 0)
    except LiftoffError as e:
        return _fail(e, e.error_code, e.exit_code, getattr(e, "details", None))
    except KeyboardInterrupt:
        print("liftoff: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        return _fail(e, "os", 1)
    except Exception as e:
        if not _json_errors:
            raise
        traceback.print_exc()
        return _fail(e, "internal", 1)


if __name__ == "__main__":
    sys.exit(main())
