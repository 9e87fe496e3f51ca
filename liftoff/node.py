"""`liftoff node install | uninstall`: put liftoff's settings into the host's containerd config and take them out.

The user's config.toml is edited with tomlkit, so everything but liftoff's keys stays byte for byte
(comments, order, other proxy plugins, registry settings). Install backs the original up once
(`CONFIG.liftoff-backup`, never overwritten) and records what it set (`CONFIG.liftoff-state.json`);
uninstall restores the backup if the file is still exactly what install wrote, else removes only
liftoff's keys. Writes are atomic (temp file, fsync, rename; same mode and owner). containerd is
then restarted (systemd, from a DaemonSet through nsenter into PID 1, or --restart-command) and
checked: `ctr plugins ls` must list `io.containerd.snapshotter.v1 <name>` with status ok (containerd
1.6 lists a proxy plugin as ok whether or not its socket answers) - or no longer list it. If
containerd does not come back with the new config, the previous file is put back and containerd
restarted again.

containerd config versions: 2 (containerd 1.6/1.7: CRI under `plugins."io.containerd.grpc.v1.cri"`)
and 3 (containerd 2.x: `plugins."io.containerd.cri.v1.images"`). A file without `version` is
version 1: refused if it has plugin sections (migrate it with containerd's own tools first);
a file with no `[plugins]` at all gets `version = 2` (what containerd 1.x assumes for new files).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.items import Table

from layerstore.errors import LiftoffError, UsageError
from snapshotter.config import DEFAULT_SOCKET, PLUGIN_NAME

DEFAULT_CONFIG = "/etc/containerd/config.toml"
DEFAULT_HOSTS_DIR = "/etc/containerd/certs.d"
DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
SNAPSHOTTER_TYPE = "io.containerd.snapshotter.v1"
NSENTER = ["nsenter", "-t", "1", "-m", "-u", "-n", "-i", "-p", "--"]
CRI_TABLES = {2: ("plugins", "io.containerd.grpc.v1.cri", "containerd"), 3: ("plugins", "io.containerd.cri.v1.images")}
REGISTRY_TABLES = {
    2: ("plugins", "io.containerd.grpc.v1.cri", "registry"),
    3: ("plugins", "io.containerd.cri.v1.images", "registry"),
}


def register(subparsers) -> None:
    node = subparsers.add_parser(
        "node",
        help="install liftoff into this node's containerd config (and take it out again)",
        description="Merge liftoff's settings into containerd's config.toml (versions 2 and 3), restart containerd "
        "and check that it lists the liftoff snapshotter; uninstall undoes it.",
    )
    sub = node.add_subparsers(dest="node_action", required=True, metavar="ACTION")
    for name, helptext, run in (
        ("install", "add the proxy plugin, CRI's snapshotter and registry config_path; restart containerd", run_install),
        ("uninstall", "restore containerd's config from before install (or remove only liftoff's keys)", run_uninstall),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--containerd-config", default=DEFAULT_CONFIG, metavar="FILE", help=f"(default {DEFAULT_CONFIG})")
        p.add_argument("--plugin-name", default=PLUGIN_NAME, help=f"proxy plugin / snapshotter name (default {PLUGIN_NAME})")
        if name == "install":
            p.add_argument("--socket", default=DEFAULT_SOCKET, help=f"the snapshotter's socket (default {DEFAULT_SOCKET})")
            p.add_argument(
                "--hosts-dir",
                default=DEFAULT_HOSTS_DIR,
                metavar="DIR",
                help=f"CRI registry config_path for hosts.toml files (default {DEFAULT_HOSTS_DIR}; kept if one is set)",
            )
            p.add_argument("--no-hosts-dir", action="store_true", help="leave CRI's registry settings alone")
            p.add_argument(
                "--keep-unpacked-layers",
                action="store_true",
                help="do not set discard_unpacked_layers (default: discard compressed blobs once unpacked)",
            )
            p.add_argument(
                "--wait-for-socket",
                type=float,
                default=0.0,
                metavar="SECONDS",
                help="first wait up to SECONDS for --socket to accept connections: containerd restarted before the "
                "snapshotter serves hides the images it holds (the DaemonSet's installer starts beside it)",
            )
            p.add_argument(
                "--hold",
                action="store_true",
                help="after installing, keep running until SIGTERM or SIGINT, then exit 0 (a container that lives as "
                "long as the install; its preStop hook runs `liftoff node uninstall`)",
            )
            p.add_argument(
                "--config-version",
                type=int,
                choices=[2, 3],
                help="version for a config file that does not exist yet (default: from `containerd --version`)",
            )
        p.add_argument("--dry-run", action="store_true", help="print the change as a diff; write and restart nothing")
        p.add_argument(
            "--restart-command",
            metavar="CMD",
            help="shell command that restarts containerd (default: systemctl restart containerd; "
            "from a container with the host's PID namespace, through nsenter into PID 1)",
        )
        p.add_argument("--no-restart", action="store_true", help="write the file, leave containerd running as it is")
        p.add_argument("--address", help="containerd's socket to check (default: the config's [grpc] address, else /run/...)")
        p.add_argument("--timeout", type=float, default=60.0, help="seconds containerd may take to come back (default 60)")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.set_defaults(run=run)


@dataclass
class Change:
    """One key install set: where, what, and what was there before."""

    table: tuple[str, ...]
    key: str
    value: Any
    previous: Any = None
    had_previous: bool = False

    def to_dict(self) -> dict:
        return {
            "table": list(self.table),
            "key": self.key,
            "value": self.value,
            "previous": self.previous,
            "had_previous": self.had_previous,
        }


@dataclass
class Plan:
    """The new text of the config and what it changes."""

    text: str
    changes: list[Change] = field(default_factory=list)
    added_tables: list[tuple[str, ...]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    version: int = 2


def _sha(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def config_version(doc: tomlkit.TOMLDocument, path: str) -> tuple[int, str | None]:
    """The config's version (2 or 3) and a note if `version = 2` has to be added; refuses version 1 and unknown ones."""
    version = doc.get("version")
    if version is None:
        if "plugins" in doc:
            raise LiftoffError(
                f"{path} has no `version` key: it is containerd's version 1 format, which liftoff does not edit; "
                "migrate it first (`containerd config migrate` in containerd 2.x, or rewrite it as version = 2) and run again"
            )
        return 2, "the file had no `version` and no plugin sections: added version = 2 (containerd 1.x's format)"
    if isinstance(version, bool) or version not in (2, 3):
        raise LiftoffError(f"{path}: containerd config version {version!r} is not one liftoff knows (2 or 3)")
    return int(version), None


def _table(doc: Any, path: tuple[str, ...], create: bool, added: list[tuple[str, ...]] | None = None) -> Any:
    """The table at `path` (None if missing and not `create`); tables made on the way are recorded in `added`."""
    node = doc
    for i, part in enumerate(path):
        if part not in node:
            if not create:
                return None
            leaf = i == len(path) - 1
            new = tomlkit.table(is_super_table=not leaf)
            node[part] = new
            if added is not None:
                added.append(path[: i + 1])
        node = node[part]
        if not hasattr(node, "keys"):
            raise LiftoffError(f"{'.'.join(path[: i + 1])} in the containerd config is not a table")
    return node


def _indent_like(table: Any) -> str | None:
    body = getattr(getattr(table, "value", None), "body", None) or []
    for key, item in body:
        if key is not None and not isinstance(item, Table) and hasattr(item, "trivia"):
            return item.trivia.indent
    return None


def _set(table: Any, key: str, value: Any) -> None:
    """Set `key`; a new key is indented like the table's other keys."""
    new = key not in table
    indent = _indent_like(table)
    table[key] = value
    if new and indent is not None:
        table.value.item(key).trivia.indent = indent


def _unwrap(value: Any) -> Any:
    return value.unwrap() if hasattr(value, "unwrap") else value


def plan_install(text: str, path: str, args: argparse.Namespace, new_file_version: int = 2) -> Plan:
    """The config with liftoff's settings merged in."""
    doc = tomlkit.parse(text)
    if not text.strip():
        version, note = new_file_version, None
        doc.add("version", version)
        doc.add(tomlkit.nl())
    else:
        version, note = config_version(doc, path)
        if note:
            body = doc.body
            doc = tomlkit.document()
            doc.add("version", 2)
            for key, item in body:
                doc.add(key, item) if key is not None else doc.add(item)
    plan = Plan(text="", version=version, notes=[note] if note else [])
    name = args.plugin_name
    wanted: list[tuple[tuple[str, ...], str, Any]] = [
        (("proxy_plugins", name), "type", "snapshot"),
        (("proxy_plugins", name), "address", args.socket),
        (CRI_TABLES[version], "snapshotter", name),
        (CRI_TABLES[version], "disable_snapshot_annotations", False),
    ]
    if not args.keep_unpacked_layers:
        wanted.append((CRI_TABLES[version], "discard_unpacked_layers", True))
    if not args.no_hosts_dir:
        registry = _table(doc, REGISTRY_TABLES[version], create=False)
        current = _unwrap(registry.get("config_path")) if registry is not None else None
        if registry is not None and "mirrors" in registry:
            plan.notes.append("CRI's registry has `mirrors`, which containerd refuses beside config_path: left as it is")
        elif current and current != args.hosts_dir:
            plan.notes.append(f"CRI's registry config_path is {current}: kept (put hosts.toml files there)")
        else:
            wanted.append((REGISTRY_TABLES[version], "config_path", args.hosts_dir))
    for table_path, key, value in wanted:
        table = _table(doc, table_path, create=True, added=plan.added_tables)
        had = key in table
        previous = _unwrap(table[key]) if had else None
        if had and previous == value:
            continue
        _set(table, key, value)
        plan.changes.append(Change(table_path, key, value, previous, had))
    for added in plan.added_tables:  # a blank line after each new leaf table keeps what follows readable
        table = _table(doc, added, create=False)
        if added in {t for t, _, _ in wanted}:
            table.add(tomlkit.nl())
    plan.text = tomlkit.dumps(doc)
    return plan


def plan_uninstall(text: str, state: dict | None, plugin_name: str) -> Plan:
    """The config without liftoff's settings: what install set goes back to what was there before."""
    doc = tomlkit.parse(text)
    plan = Plan(text="")
    if state is not None:
        changes = [Change(tuple(c["table"]), c["key"], c["value"], c["previous"], c["had_previous"]) for c in state["changes"]]
        added = [tuple(t) for t in state.get("added_tables", [])]
    else:  # installed by other means: take out what is unmistakably liftoff's
        changes = [Change(("proxy_plugins", plugin_name), k, None) for k in ("type", "address")]
        changes += [Change(t, "snapshotter", plugin_name) for t in CRI_TABLES.values()]
        added = [("proxy_plugins", plugin_name)]
        plan.notes.append("no record of an install: removed the proxy plugin and CRI's snapshotter setting only")
    for change in changes:
        table = _table(doc, change.table, create=False)
        if table is None or change.key not in table:
            continue
        if change.value is not None and _unwrap(table[change.key]) != change.value:
            plan.notes.append(f"{'.'.join(change.table)}.{change.key} was changed since install: kept")
            continue
        if change.had_previous:
            _set(table, change.key, change.previous)
        else:
            del table[change.key]
    removed = False
    for path in sorted(added, key=len, reverse=True):
        table = _table(doc, path, create=False)
        if table is not None and not any(k is not None for k, _ in table.value.body):
            parent = _table(doc, path[:-1], create=False) if len(path) > 1 else doc
            del parent[path[-1]]
            removed = True
    plan.text = tomlkit.dumps(doc)
    if removed:  # appending the table added a blank line before it
        plan.text = plan.text.rstrip("\n") + "\n"
    return plan


def atomic_write(path: Path, data: bytes, like: os.stat_result | None) -> None:
    """Replace `path` with `data`: temp file, fsync, same mode and owner as `like`, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.liftoff-{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        if like is not None:
            os.fchmod(fd, like.st_mode & 0o7777)
            if os.geteuid() == 0:
                os.fchown(fd, like.st_uid, like.st_gid)
        else:
            os.fchmod(fd, 0o644)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def _in_host_mount_namespace() -> bool:
    try:
        return os.readlink("/proc/1/ns/mnt") == os.readlink("/proc/self/ns/mnt")
    except OSError:
        return True


def restart_plan(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The restart command and the prefix that runs host tools (nsenter from a container)."""
    if args.restart_command:
        return ["sh", "-c", args.restart_command], []
    if not _in_host_mount_namespace():
        return [*NSENTER, "systemctl", "restart", "containerd"], NSENTER
    if Path("/run/systemd/system").is_dir():
        return ["systemctl", "restart", "containerd"], []
    raise UsageError(
        "systemd does not run this machine: pass --restart-command CMD (or --no-restart and restart containerd yourself)"
    )


def containerd_address(doc_text: str, args: argparse.Namespace) -> str:
    """The socket to check: --address, else the config's [grpc] address, else containerd's default."""
    if args.address:
        return args.address
    try:
        grpc = tomlkit.parse(doc_text).get("grpc") or {}
    except Exception:
        grpc = {}
    return str(_unwrap(grpc.get("address")) or DEFAULT_ADDRESS)


def plugin_rows(output: str) -> list[tuple[str, str, str]]:
    """(type, id, status) of each line of `ctr plugins ls`."""
    rows = []
    for line in output.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 3:
            rows.append((parts[0], parts[1], parts[-1]))
    return rows


def wait_for_plugin(prefix: list[str], address: str, name: str, present: bool, timeout: float) -> str:
    """Poll `ctr plugins ls` until containerd answers and lists (or no longer lists) the snapshotter; its status."""
    ctr = shutil.which("ctr") if not prefix else "ctr"
    if ctr is None:
        raise LiftoffError("ctr (containerd's CLI) is needed to check containerd: install it beside containerd")
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        try:
            done = subprocess.run(
                [*prefix, ctr, "--address", address, "plugins", "ls"],
                capture_output=True,
                text=True,
                timeout=max(1.0, min(10.0, deadline - time.monotonic())),
                stdin=subprocess.DEVNULL,
            )
            if done.returncode == 0:
                row = next((r for r in plugin_rows(done.stdout) if r[0] == SNAPSHOTTER_TYPE and r[1] == name), None)
                if present and row is not None:
                    if row[2] == "ok":
                        return "ok"
                    raise LiftoffError(f"containerd lists the {name} snapshotter with status {row[2]} (see containerd's log)")
                if not present and row is None:
                    return "absent"
                last = "it lists the plugin" if row else f"it does not list {SNAPSHOTTER_TYPE} {name}"
            else:
                last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["ctr failed"]
                last = last[0]
        except subprocess.TimeoutExpired:
            last = "ctr timed out"
        if time.monotonic() >= deadline:
            raise LiftoffError(f"containerd at {address} did not come back as expected within {timeout:.0f} s: {last}")
        time.sleep(0.2)


def _restart_and_check(args: argparse.Namespace, address: str, present: bool) -> str:
    command, prefix = restart_plan(args)
    try:
        done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=sys.stderr, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        raise LiftoffError(f"restarting containerd ({shlex.join(command)}) took over {args.timeout:.0f} s") from None
    if done.returncode != 0:
        raise LiftoffError(f"restarting containerd failed ({shlex.join(command)} exited {done.returncode})")
    return wait_for_plugin(prefix, address, args.plugin_name, present, args.timeout)


def _paths(config: Path) -> tuple[Path, Path]:
    return config.with_name(config.name + ".liftoff-backup"), config.with_name(config.name + ".liftoff-state.json")


def _new_file_version() -> int:
    binary = shutil.which("containerd")
    if binary is None:
        return 2
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 2
    match = re.search(r"\sv?(\d+)\.\d+", out)
    return 3 if match and int(match.group(1)) >= 2 else 2


def _report(args: argparse.Namespace, result: dict) -> None:
    if args.json:
        print(json.dumps(result))
        return
    for note in result["notes"]:
        print(f"note: {note}")
    print(result["summary"])


def _apply(args: argparse.Namespace, config: Path, old: str, new: str, present: bool) -> tuple[bool, str | None]:
    """Write `new` (unless a dry run), restart containerd and check it; on a failed check put `old` back."""
    like = config.stat() if config.exists() else None
    atomic_write(config, new.encode(), like)
    if args.no_restart:
        return False, None
    address = containerd_address(new, args)
    try:
        return True, _restart_and_check(args, address, present)
    except LiftoffError as e:
        atomic_write(config, old.encode(), like)
        try:
            _restart_and_check(args, address, not present)
            again = "restarted it"
        except LiftoffError as second:
            again = f"restarting it failed too: {second}"
        raise LiftoffError(f"{e}; put the previous {config} back and {again}") from None


def wait_for_socket(path: str, timeout: float) -> None:
    """Return once the unix socket at `path` accepts a connection; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = "it does not exist"
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(path)
                return
            except OSError as e:
                last = e.strerror or str(e)
        if time.monotonic() >= deadline:
            raise LiftoffError(
                f"the snapshotter's socket {path} did not accept connections within {timeout:.0f} s ({last}): "
                "start `liftoff snapshotter --socket " + path + "` first; containerd was left as it is"
            )
        time.sleep(0.2)


def hold() -> int:
    """Block until SIGTERM or SIGINT; exit 0 (the installer container's life after the install)."""
    signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    print("holding until SIGTERM (the preStop hook runs `liftoff node uninstall`)", file=sys.stderr, flush=True)
    signal.sigwait(signals)
    return 0


def run_install(args: argparse.Namespace) -> int:
    code = _install(args)
    sys.stdout.flush()
    return hold() if getattr(args, "hold", False) and not args.dry_run else code


def _install(args: argparse.Namespace) -> int:
    config = Path(args.containerd_config)
    if getattr(args, "wait_for_socket", 0) and not args.dry_run:
        wait_for_socket(args.socket, args.wait_for_socket)
    backup, state_path = _paths(config)
    existed = config.exists()
    old = config.read_text() if existed else ""
    version = args.config_version or (_new_file_version() if not old.strip() else 2)
    try:
        plan = plan_install(old, str(config), args, version)
    except tomlkit.exceptions.ParseError as e:
        raise LiftoffError(f"{config} is not valid TOML ({e}): fix it first") from None
    state = json.loads(state_path.read_text()) if state_path.exists() else None
    result: dict[str, Any] = {
        "action": "install",
        "config": str(config),
        "version": plan.version,
        "changed": plan.text != old,
        "restarted": False,
        "plugin": None,
        "backup": str(backup) if backup.exists() else None,
        "notes": plan.notes,
    }
    if args.dry_run:
        sys.stdout.writelines(
            difflib.unified_diff(old.splitlines(True), plan.text.splitlines(True), str(config), f"{config} (liftoff)")
        )
        return 0
    if plan.text == old:
        result["summary"] = f"{config}: liftoff's settings are in place already; nothing changed"
        _report(args, result)
        return 0
    if not backup.exists():
        has_liftoff = _table(tomlkit.parse(old), ("proxy_plugins", args.plugin_name), create=False) is not None if old else False
        if has_liftoff:
            plan.notes.append(f"{config} had liftoff's proxy plugin already: no backup made (uninstall removes liftoff's keys)")
        else:
            atomic_write(backup, old.encode(), config.stat() if existed else None)
            result["backup"] = str(backup)
    changes = [c.to_dict() for c in plan.changes]
    if state is not None:  # a second install: what was there before the first one stays the record
        known = {(tuple(c["table"]), c["key"]) for c in state["changes"]}
        changes = state["changes"] + [c for c in changes if (tuple(c["table"]), c["key"]) not in known]
    new_state = {
        "created": (state or {}).get("created", not existed),
        "installed_sha256": _sha(plan.text),
        "changes": changes,
        "added_tables": (state or {}).get("added_tables", []) + [list(t) for t in plan.added_tables],
    }
    atomic_write(state_path, json.dumps(new_state, indent=1).encode(), None)
    restarted, status = _apply(args, config, old, plan.text, present=True)
    result.update(changed=True, restarted=restarted, plugin=status)
    what = (
        f"containerd restarted: {SNAPSHOTTER_TYPE} {args.plugin_name} {status}" if restarted else "restart containerd to use it"
    )
    result["summary"] = f"{config}: liftoff installed (config version {plan.version}); {what}"
    _report(args, result)
    return 0


def run_uninstall(args: argparse.Namespace) -> int:
    config = Path(args.containerd_config)
    backup, state_path = _paths(config)
    state = json.loads(state_path.read_text()) if state_path.exists() else None
    old = config.read_text() if config.exists() else ""
    result: dict[str, Any] = {
        "action": "uninstall",
        "config": str(config),
        "changed": False,
        "restarted": False,
        "plugin": None,
        "notes": [],
    }
    restore = state is not None and backup.exists() and _sha(old) == state["installed_sha256"]
    if restore:
        new = backup.read_text()
        how = f"restored from {backup}"
    else:
        try:
            plan = plan_uninstall(old, state, args.plugin_name) if old else Plan(text="")
        except tomlkit.exceptions.ParseError as e:
            raise LiftoffError(f"{config} is not valid TOML ({e}): fix it first") from None
        new, result["notes"] = plan.text, plan.notes
        how = "liftoff's keys removed (the file changed since install)" if state else "liftoff's keys removed"
    if args.dry_run:
        sys.stdout.writelines(
            difflib.unified_diff(old.splitlines(True), new.splitlines(True), str(config), f"{config} (without liftoff)")
        )
        return 0
    if new == old:
        for path in (state_path, backup):
            path.unlink(missing_ok=True)
        result["summary"] = f"{config}: no liftoff settings; nothing changed"
        _report(args, result)
        return 0
    restarted, status = _apply(args, config, old, new, present=False)
    for path in (state_path, backup):
        path.unlink(missing_ok=True)
    result.update(changed=True, restarted=restarted, plugin=status)
    what = "containerd restarted without liftoff" if restarted else "restart containerd to stop using liftoff"
    result["summary"] = f"{config}: {how}; {what}"
    _report(args, result)
    return 0
