"""One configuration file for every command: file < environment < flags, values parsed by the options' own parsers,
unknown tables and keys refused in one line, `liftoff config show` naming each value's source."""

from __future__ import annotations

import json

import pytest

from liftoff.cli import main
from tests.conftest import run_cli

CONFIG = """\
log_level = "error"
[store]
urls = ["file:///tmp/liftoff-a", "file:///tmp/liftoff-b"]
[fused]
root = "/var/lib/liftoff/snapshotter/remote"
cache-size = "10G"
no_resend = true
[weights.load]
device = "cuda:0"
pool = "256M"
"""


def show(*words: str, config=None, env: dict | None = None) -> dict:
    args = ["--config", str(config)] if config else []
    done = run_cli(*args, "config", "show", "--json", *words, env=env)
    return json.loads(done.stdout)["settings"]


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(CONFIG)
    return path


def test_file_then_environment_then_flags(config):
    settings = show("fused", config=config)
    assert settings["cache_size"] == {"value": 10 << 30, "source": "file", "where": "[fused]"}  # parsed as a size
    assert settings["store"]["value"] == ["file:///tmp/liftoff-a", "file:///tmp/liftoff-b"]
    assert settings["store"]["where"] == "[store]" and settings["root"]["source"] == "file"
    assert settings["resend"]["value"] is False  # `no_resend = true`
    assert settings["prefetch_threads"] == {"value": 16, "source": "default", "where": ""}

    env = {"LIFTOFF_FUSED_CACHE_SIZE": "3G", "LIFTOFF_STORE_URLS": "file:///x,file:///y"}
    settings = show("fused", config=config, env=env)
    assert settings["cache_size"] == {"value": 3 << 30, "source": "env", "where": "LIFTOFF_FUSED_CACHE_SIZE"}
    assert settings["store"]["value"] == ["file:///x", "file:///y"]

    settings = show("fused", "--cache-size", "1M", "--store", "file:///z", config=config, env=env)
    assert settings["cache_size"]["value"] == 1 << 20 and settings["cache_size"]["source"] == "flag"
    assert settings["store"]["value"] == ["file:///z"]  # a flag replaces the list, never appends to the file's

    settings = show("weights", "load", config=config, env={"LIFTOFF_CONFIG": ""})
    assert settings["device"]["value"] == "cuda:0" and settings["pool"]["value"] == 256 << 20


def test_config_from_the_environment_variable_and_required_options(config, capsys):
    """LIFTOFF_CONFIG names the file; an option the command requires (fused --root, --store) may come from it."""
    done = run_cli("config", "show", "--json", "fused", env={"LIFTOFF_CONFIG": str(config)})
    assert json.loads(done.stdout)["config"] == str(config)
    # `liftoff fused` parses with --root and --store from the file: the file's bad value is what fails
    done = run_cli("fused", "--cache-size", "10X", env={"LIFTOFF_CONFIG": str(config)}, check=False)
    assert done.returncode == 2 and "argument --cache-size: '10X' is not a size" in done.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[fused]\ncache_sise = 1\n", "[fused] has no setting 'cache_sise' (liftoff fused takes: cache_size"),
        ('[fused]\ncache_size = "10X"\n', "[fused] cache_size: '10X' is not a size"),
        ("[nosuch]\na = 1\n", "[nosuch] names no command"),
        ('[store]\nurl = "x"\n', "[store] has no setting 'url'"),
        ('[fused]\nprefetch_threads = "many"\n', "[fused] prefetch_threads: 'many' is not a valid int"),
        ('[snapshotter]\nlog_level = "loud"\n', "[snapshotter] log_level: 'loud' is not one of debug, info, warning, error"),
        ('[fused]\ntakeover = "yes"\n', "[fused] takeover: expected true or false"),
        ("[fused\n", "not valid TOML"),
    ],
)
def test_a_bad_file_is_one_usage_error_naming_file_section_and_key(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    command = text.split("]")[0].lstrip("[") if text.startswith("[snapshotter]") else "fused"
    done = run_cli(
        "--config", str(path), command, "--root", "/nonexistent", "--store", "file:///nonexistent", check=False, timeout=30
    )
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, done.stderr
    assert err[0].startswith(f"liftoff: error: {path}") and message in err[0], err


def test_a_bad_environment_value_names_the_variable(capsys, monkeypatch):
    monkeypatch.setenv("LIFTOFF_FUSED_CACHE_SIZE", "lots")
    assert main(["fused", "--root", "/nonexistent", "--store", "file:///nonexistent"]) == 2
    assert "LIFTOFF_FUSED_CACHE_SIZE: 'lots' is not a size" in capsys.readouterr().err


def test_a_missing_named_config_file_is_a_usage_error(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "none.toml"), "ls", "--store", "file:///nonexistent", "--json"]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out)["error"] == {
        "code": "usage",
        "message": f"{tmp_path / 'none.toml'}: no such configuration file (named by --config)",
        "exit": 2,
    }
    assert err.strip() == f"liftoff: error: {tmp_path / 'none.toml'}: no such configuration file (named by --config)"


def test_show_prints_sources(config):
    out = run_cli("--config", str(config), "config", "show", "fused", "--takeover").stdout
    assert "cache_size = 10737418240" in out and "# file [fused]" in out
    assert "takeover = true" in out and "# flag" in out


def test_global_options_before_config_do_not_hide_it(config):
    """`--config` is found after global options that take values (`--log-format json --config FILE fused`)."""
    done = run_cli("--log-level", "info", "--log-format", "json", "--config", str(config), "config", "show", "--json", "fused")
    assert json.loads(done.stdout)["settings"]["cache_size"]["source"] == "file"
