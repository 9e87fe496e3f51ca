"""The liftoff command line: every component's commands are reachable and routed to their owner."""

import argparse
import importlib
import importlib.metadata
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
