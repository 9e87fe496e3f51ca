"""The liftoff command line: every component's commands are reachable and routed to their owner."""

import argparse
import importlib
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from layerstore import __version__
from liftoff import cli
from tests.conftest import run_cli


def test_commands_table_matches_registrations():
    for module in cli.COMPONENTS:
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        importlib.import_module(module).register(sub)
        for name in sub.choices:
            assert cli.COMMANDS.get(name) == module, f"{name} is registered by {module} but routed elsewhere"
    assert set(cli.COMMANDS.values()) <= set(cli.COMPONENTS)


def test_help_lists_every_command():
    out = run_cli("--help").stdout
    for name in cli.COMMANDS:
        assert name in out


def test_unknown_command_fails_cleanly():
    done = run_cli("no-such-command", check=False)
    assert done.returncode == 2 and "invalid choice" in done.stderr


@pytest.mark.parametrize(
    ("command", "args", "option"),
    [
        ("fused", ["--root", "/nonexistent", "--store", "file:///nonexistent"], "--cache-size"),
        ("fused", ["--root", "/nonexistent", "--store", "file:///nonexistent"], "--max-readahead"),
        ("fused", ["--root", "/nonexistent", "--store", "file:///nonexistent"], "--fill-rate"),
        ("snapshotter", ["--root", "/nonexistent"], "--cache-size"),
        ("snapshotter", ["--root", "/nonexistent"], "--fuse-readahead"),
        ("convert", ["oci:/nonexistent:v1", "--store", "file:///nonexistent"], "--chunk-size"),
        ("weights bench", ["file:///nonexistent"], "--range-size"),
        ("weights load", ["file:///nonexistent"], "--pool"),
        ("proxy", ["--upstream", "a.io=https://a.io", "--cache-dir", "/nonexistent"], "--cache-size"),
        ("proxy", ["--upstream", "a.io=https://a.io", "--cache-dir", "/nonexistent"], "--max-manifest-size"),
    ],
)
def test_a_bad_size_is_a_usage_error_naming_the_option(command, args, option):
    """Every size option parses with layerstore.units: a typo is argparse's one error line, exit 2."""
    done = run_cli(*command.split(), *args, option, "10X", check=False, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"liftoff {command}: error: argument {option}: '10X' is not a size"), done.stderr


def test_the_installed_command_is_liftoff_cli_main():
    """The `liftoff` console script of the liftoff-serving distribution runs liftoff.cli:main, which the
    foundation does not hold (layerstore imports no component: tests/test_layers.py)."""
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="liftoff")
    assert (script.value, script.dist.name) == ("liftoff.cli:main", "liftoff-serving")
    assert script.load() is cli.main
    done = subprocess.run([Path(sys.executable).parent / "liftoff", "--version"], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0 and done.stdout.strip() == f"liftoff {__version__}", done.stderr


def test_exit_codes_belong_to_the_error_classes():
    """The foundation's error classes carry the documented exit codes; the store's lease conflict is 'busy' (3)."""
    from layerstore import errors
    from layerstore.leases import StoreBusy

    assert (errors.LiftoffError.exit_code, errors.UsageError.exit_code) == (1, 2)
    assert (errors.Busy.exit_code, errors.VerificationFailed.exit_code) == (3, 4)
    assert StoreBusy("x").exit_code == 3 and isinstance(StoreBusy("x"), errors.StoreError)
    assert errors.ObjectNotFound("x").exit_code == 1
    help_text = run_cli("--help").stdout
    for line in ("0  ok", "1  error", "2  usage", "3  busy", "4  verification failed"):
        assert line in help_text


# A failing invocation of every command that has --json: (argv, expected exit, expected error code).
JSON_FAILURES = [
    (["convert", "oci:/nonexistent:v1", "--store", "file:///nonexistent"], 1, None),
    (["replicate", "--from", "file:///nonexistent/a", "--to", "file:///nonexistent/b"], 1, "error"),
    (["inspect", "nosuch", "--store", "file:///nonexistent"], 1, "not_found"),
    (["verify", "nosuch", "--store", "file:///nonexistent"], 1, "not_found"),
    (["rm", "nosuch", "--store", "file:///nonexistent"], 1, "not_found"),
    (["profile", "nosuch", "--show", "--store", "file:///nonexistent"], 1, "not_found"),
    (["pull", "registry.invalid/x:1", "--address", "/nonexistent.sock"], 1, "error"),
    (["weights", "load", "file:///nonexistent"], 1, "not_found"),
    (["weights", "bench", "file:///nonexistent"], 1, "not_found"),
    (["node", "install", "--containerd-config", "/nonexistent/dir/config.toml", "--no-restart"], 1, None),
    (["node", "uninstall", "--containerd-config", "/nonexistent/dir/config.toml", "--no-restart"], 0, None),
    (["ls"], 2, "usage"),
    (["gc", "--store", "file:///x", "--lease-ttl", "soon"], 2, "usage"),
    (["compact", "plan", "--method", "nosuch"], 2, "usage"),
    (["compact", "run", "--interval", "x"], 2, "usage"),
    (["compact", "simulate", "--hours", "x"], 2, "usage"),
    (["config", "show", "fused", "--cache-size", "10X"], 2, "usage"),
]


@pytest.mark.parametrize(("argv", "exit_code", "code"), JSON_FAILURES, ids=[" ".join(a[:2]) for a, _, _ in JSON_FAILURES])
def test_json_errors_have_one_shape(argv, exit_code, code):
    """Under --json a failure is {"error": {"code", "message", "exit"}} on stdout and one line on stderr."""
    where = 2 if argv[0] in ("weights", "compact", "node", "config") else 1
    argv = [*argv[:where], "--json", *argv[where:]] if argv[0] != "config" else [*argv[:2], "--json", *argv[2:]]
    done = run_cli(*argv, check=False, timeout=120)
    assert done.returncode == exit_code, (done.stdout, done.stderr)
    if exit_code == 0:
        return
    (line,) = done.stdout.strip().splitlines()
    error = json.loads(line)["error"]
    assert set(error) >= {"code", "message", "exit"} and error["exit"] == exit_code
    assert code is None or error["code"] == code, error
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(("liftoff: error:", "liftoff ")), done.stderr


def test_plain_errors_are_one_line_on_stderr():
    done = run_cli("inspect", "nosuch", "--store", "file:///nonexistent", check=False)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and done.stderr.startswith("liftoff: error: no image")
