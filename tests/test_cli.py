"""The liftoff command line: every component's commands are reachable and routed to their owner."""

import argparse
import importlib

from layerstore import cli
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
