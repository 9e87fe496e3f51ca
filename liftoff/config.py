"""One configuration file for every command, and `liftoff config show`.

`--config FILE` (before the command), else `$LIFTOFF_CONFIG`, else `/etc/liftoff/config.toml` if it
exists, is a TOML file with a table per command; its keys are the command's long options without
the dashes (`cache-size` or `cache_size`; the option's argparse dest works too):

    log_level = "info"                  # global options at the top
    [store]                             # the store options of every command that opens stores
    urls = ["s3://bucket-us/liftoff", "s3://bucket-eu/liftoff"]
    [fused]
    root = "/var/lib/liftoff/snapshotter/remote"
    cache_size = "10G"
    [weights.load]                      # a subcommand's table sits in its command's
    device = "cuda:0"

Values are parsed by the option's own parser (sizes by layerstore.units). Then the environment
overrides the file (`LIFTOFF_FUSED_CACHE_SIZE=20G`, `LIFTOFF_WEIGHTS_LOAD_DEVICE`,
`LIFTOFF_STORE_URLS=a,b`), and flags on the command line override both. An unknown table or key
is one usage error naming the file, the table and the key.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from layerstore.errors import UsageError

DEFAULT_PATH = "/etc/liftoff/config.toml"
PATH_ENV = "LIFTOFF_CONFIG"
STORE_SECTION = "store"
STORE_KEYS = {"urls": "store", "store": "store", "endpoint_url": "endpoint_url", "region": "region", "path_style": "path_style"}
NOT_CONFIGURABLE = {"help", "version", "config"}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


class _Unset:
    """The default every option gets while settings apply: tells 'not on the command line' apart."""

    def __copy__(self) -> list:  # an append option given on the command line starts from an empty list
        return []

    def __repr__(self) -> str:
        return "<unset>"


UNSET: Any = _Unset()


@dataclass
class Setting:
    """One option's effective value and where it came from."""

    name: str
    dest: str
    value: Any
    source: str  # default, file, env or flag
    where: str = ""


def _name(action: argparse.Action) -> str:
    if isinstance(action, argparse._StoreFalseAction):
        return action.dest  # `--no-resend` is the setting `resend`
    longs = [s for s in action.option_strings if s.startswith("--")]
    return (longs[0][2:] if longs else action.dest).replace("-", "_")


def _configurable(action: argparse.Action) -> bool:
    return bool(action.option_strings) and action.dest not in NOT_CONFIGURABLE and action.default is not argparse.SUPPRESS


def _zero_args(action: argparse.Action) -> bool:
    return action.nargs == 0


def _many(action: argparse.Action) -> bool:
    return isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+") or isinstance(action.nargs, int)


def _check_choices(action: argparse.Action, value: Any, where: str) -> Any:
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise UsageError(f"{where}: {value!r} is not one of {choices}")
    return value


def _convert_one(action: argparse.Action, raw: Any, where: str) -> Any:
    if isinstance(raw, bool | dict | list):
        raise UsageError(f"{where}: expected a {'value' if action.type else 'string'}, got {json.dumps(raw)}")
    if action.type is None:
        if not isinstance(raw, str):
            raise UsageError(f"{where}: expected a string, got {raw!r} (quote it)")
        return _check_choices(action, raw, where)
    try:
        value = action.type(str(raw))
    except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
        message = str(e) or f"{raw!r} is not a valid {getattr(action.type, '__name__', 'value')}"
        if isinstance(e, ValueError) and not isinstance(e, argparse.ArgumentTypeError) and action.type in (int, float):
            message = f"{raw!r} is not a valid {action.type.__name__}"
        raise UsageError(f"{where}: {message}") from None
    return _check_choices(action, value, where)


def convert(action: argparse.Action, raw: Any, where: str, key: str, from_env: bool = False) -> Any:
    """`raw` (a TOML value, or an environment string) as the option's parser would store it."""
    if _zero_args(action):
        if from_env:
            word = str(raw).strip().lower()
            if word not in _TRUE | _FALSE:
                raise UsageError(f"{where}: {raw!r} is neither true nor false")
            raw = word in _TRUE
        if not isinstance(raw, bool):
            raise UsageError(f"{where}: expected true or false, got {json.dumps(raw)}")
        if key != action.dest and isinstance(action, argparse._StoreFalseAction):
            return not raw  # `no_resend = true` means resend = False
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            return raw
        return action.const if raw else action.default
    if _many(action):
        if from_env:
            text = str(raw).strip()
            try:
                raw = (
                    tomllib.loads(f"v = {text}")["v"]
                    if text.startswith("[")
                    else [p.strip() for p in text.split(",") if p.strip()]
                )
            except tomllib.TOMLDecodeError as e:
                raise UsageError(f"{where}: not a TOML array ({e})") from None
        items = raw if isinstance(raw, list) else [raw]
        return [_convert_one(action, item, where) for item in items]
    return _convert_one(action, raw, where)


class Settings:
    """The configuration file's and the environment's values, put into parsers as they parse."""

    def __init__(self, path: str | None, data: Mapping[str, Any], environ: Mapping[str, str], commands: set[str]) -> None:
        self.path = path
        self.data = data
        self.environ = environ
        self.commands = commands
        self.show = False  # `config show`: no positional or option is required
        self.applied: list[tuple[tuple[str, ...], dict[str, Setting], dict[str, argparse.Action]]] = []
        self._check_top()

    @classmethod
    def load(cls, explicit: str | None, environ: Mapping[str, str], commands: set[str]) -> Settings:
        """Read `explicit`, else $LIFTOFF_CONFIG, else the default path if it exists (none: no file)."""
        path = explicit or environ.get(PATH_ENV) or None
        if path is None and os.path.exists(DEFAULT_PATH):
            path = DEFAULT_PATH
        data: dict[str, Any] = {}
        if path is not None:
            try:
                with open(path, "rb") as f:
                    data = tomllib.load(f)
            except FileNotFoundError:
                via = "--config" if explicit else f"${PATH_ENV}"
                raise UsageError(f"{path}: no such configuration file (named by {via})") from None
            except OSError as e:
                raise UsageError(f"{path}: cannot read the configuration file: {e.strerror or e}") from None
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise UsageError(f"{path}: not valid TOML: {e}") from None
        return cls(path, data, environ, commands)

    def _check_top(self) -> None:
        for key, value in self.data.items():
            if isinstance(value, dict) and key not in self.commands | {STORE_SECTION}:
                raise UsageError(
                    f"{self.path}: [{key}] names no command (commands: {', '.join(sorted(self.commands))}, or [store])"
                )
        for key in self.data.get(STORE_SECTION, {}):
            if key not in STORE_KEYS:
                raise UsageError(
                    f"{self.path}: [store] has no setting {key!r} (settings: urls, endpoint_url, region, path_style)"
                )

    def section(self, path: tuple[str, ...]) -> dict[str, Any]:
        """The table of the command `path` (the top level for ()); empty if the file has none."""
        table: Any = self.data
        for i, part in enumerate(path):
            table = table.get(part, {}) if isinstance(table, dict) else {}
            if not isinstance(table, dict):
                raise UsageError(f"{self.path}: {'.'.join(path[: i + 1])} must be a table ([{'.'.join(path[: i + 1])}])")
        return table

    def apply(self, parser: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        """Give the options of the parser of command `path` their file and environment values (defaults become UNSET)."""
        actions = {a.dest: a for a in parser._actions if _configurable(a)}
        by_key = {}
        for action in actions.values():
            by_key[_name(action)] = action
            by_key.setdefault(action.dest, action)
            for option in action.option_strings:
                if option.startswith("--"):
                    by_key.setdefault(option[2:].replace("-", "_"), action)
        subcommands = {name for a in parser._actions if isinstance(a, argparse._SubParsersAction) for name in a.choices}
        title = f"[{'.'.join(path)}]" if path else "the top level"
        found: dict[str, Setting] = {}
        for dest, action in actions.items():
            found[dest] = Setting(_name(action), dest, action.default, "default")
        for key, raw in self.data.get(STORE_SECTION, {}).items():
            action = actions.get(STORE_KEYS[key])
            if action is not None:
                where = f"{self.path}: [store] {key}"
                found[action.dest] = Setting(
                    _name(action), action.dest, convert(action, raw, where, action.dest), "file", "[store]"
                )
        for key, raw in self.section(path).items():
            if isinstance(raw, dict) and key in subcommands:
                continue
            action = by_key.get(key.replace("-", "_"))
            if action is None:
                known = ", ".join(sorted(_name(a) for a in actions.values())) or "none"
                if not path and isinstance(raw, dict):
                    continue  # a command's table: checked when it runs
                raise UsageError(f"{self.path}: {title} has no setting {key!r} (liftoff {' '.join(path)} takes: {known})")
            where = f"{self.path}: {title} {key}"
            found[action.dest] = Setting(
                _name(action), action.dest, convert(action, raw, where, key.replace("-", "_")), "file", title
            )
        prefix = "_".join(("LIFTOFF", *path)).upper().replace("-", "_") + "_"
        for store_key, dest in (
            ("URLS", "store"),
            ("ENDPOINT_URL", "endpoint_url"),
            ("REGION", "region"),
            ("PATH_STYLE", "path_style"),
        ):
            if dest in actions and f"LIFTOFF_STORE_{store_key}" in self.environ:
                self._from_env(found, actions[dest], f"LIFTOFF_STORE_{store_key}")
        for action in actions.values():
            variable = prefix + _name(action).upper()
            if variable in self.environ:
                self._from_env(found, action, variable)
        for dest, action in actions.items():
            if found[dest].source != "default":
                action.required = False
            action.default = UNSET
        if self.show:
            for action in parser._actions:
                action.required = False
                if not action.option_strings and action.nargs in (None, "+"):
                    action.nargs = "?" if action.nargs is None else "*"
        self.applied.append((path, found, actions))

    def _from_env(self, found: dict[str, Setting], action: argparse.Action, variable: str) -> None:
        value = convert(action, self.environ[variable], variable, action.dest, from_env=True)
        found[action.dest] = Setting(_name(action), action.dest, value, "env", variable)

    def resolve(self, args: argparse.Namespace) -> dict[str, Setting]:
        """Replace UNSET in parsed `args` by the file's, the environment's or the option's default; returns every setting."""
        effective: dict[str, Setting] = {}
        for _path, found, actions in self.applied:  # outer commands first: an inner command's option of the same dest wins
            for dest, setting in found.items():
                current = getattr(args, dest, UNSET)
                if current is UNSET:
                    value = setting.value
                    action = actions[dest]
                    if setting.source == "default" and isinstance(value, str) and action.type is not None:
                        value = action.type(value)  # as argparse converts a string default
                    effective[dest] = Setting(setting.name, dest, value, setting.source, setting.where)
                else:
                    effective[dest] = Setting(setting.name, dest, current, "flag")
        for dest, setting in effective.items():
            setattr(args, dest, setting.value)
        return effective


_active: list[Settings] = []


@contextlib.contextmanager
def active(settings: Settings) -> Iterator[Settings]:
    """Parsers built with LiftoffParser apply `settings` while this block parses."""
    _active.append(settings)
    try:
        yield settings
    finally:
        _active.pop()


def current() -> Settings | None:
    """The settings that parsers apply now, if any."""
    return _active[-1] if _active else None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "config",
        help="show the effective settings of a command and where each comes from",
        description="Settings come from the option's default, the configuration file (--config, $LIFTOFF_CONFIG or "
        f"{DEFAULT_PATH}), the environment (LIFTOFF_<COMMAND>_<OPTION>) and flags, each overriding the one before.",
    )
    sub = p.add_subparsers(dest="config_action", required=True, metavar="ACTION")
    s = sub.add_parser("show", help="print the effective settings of COMMAND (with its flags, if given) and their sources")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument(
        "words", nargs=argparse.REMAINDER, metavar="COMMAND [OPTIONS]", help="e.g. fused, weights load --device cuda:0"
    )
    s.set_defaults(run=run_show)


def _toml_value(value: Any) -> str:
    return json.dumps(value, default=str)


def run_show(args: argparse.Namespace) -> int:
    from liftoff.cli import COMMANDS, build_parser

    settings = args.settings
    words = list(args.words)
    if not words:
        print(f"# configuration file: {settings.path or 'none'}")
        print("# name a command to see its settings: liftoff config show COMMAND [SUBCOMMAND] [OPTIONS]")
        print(f"# commands: {', '.join(sorted(COMMANDS))}")
        return 0
    show = Settings(settings.path, settings.data, settings.environ, settings.commands)
    show.show = True
    parser = build_parser(words)
    with active(show):
        parsed = parser.parse_args(words)
    show.applied = [entry for entry in show.applied if entry[0]]  # the command's own settings, not the globals
    effective = show.resolve(parsed)
    command = " ".join(show.applied[-1][0]) if show.applied else words[0]
    if args.json:
        out = {
            "command": command,
            "config": settings.path,
            "settings": {s.name: {"value": s.value, "source": s.source, "where": s.where} for s in effective.values()},
        }
        print(json.dumps(out, default=str))
        return 0
    print(f"# liftoff {command}: configuration file {settings.path or 'none'}")
    for s in sorted(effective.values(), key=lambda s: s.name):
        origin = s.source + (f" {s.where}" if s.where else "")
        line = f"{s.name} = {_toml_value(s.value)}" if s.value is not None else f"# {s.name} unset"
        print(f"{line:<60} # {origin}")
    return 0


def config_path_argument(
    argv: list[str], value_options: tuple[str, ...] = ("--config", "--log-level", "--log-format")
) -> str | None:
    """The value of a global `--config FILE` / `--config=FILE` before the command (`value_options`: the global
    options that take a value), if any."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if not arg.startswith("-") and (i == 0 or argv[i - 1] not in value_options):
            return None
    return None
