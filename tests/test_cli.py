"""The liftoff command line: every component's commands are reachable and routed to their owner."""

import argparse
import importlib

import pytest

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
