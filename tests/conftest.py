"""Shared fixtures: real services on loopback (docker-registry, an S3 server) and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from liftoff.devstack.services import Registry, S3Server, start_registry, start_s3

ROOT = Path(__file__).resolve().parent.parent
REGISTRY_CREDENTIALS = ("liftoff", "s3cret-pass")

# Ray Serve kills a proxy actor that is not ready within 5 s (and serve.start() then fails). On a 2-core CI
# machine busy with other work, the proxy's own start (its imports) takes longer than that, so every Ray
# cluster the tests start (they inherit this environment) gives it a minute.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")


@pytest.fixture(scope="session")
def registry(tmp_path_factory) -> Registry:
    """An anonymous docker-registry on 127.0.0.1 (plain HTTP)."""
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory) -> Registry:
    """A docker-registry that requires htpasswd basic auth."""
    reg = start_registry(tmp_path_factory.mktemp("auth-registry"), credentials=REGISTRY_CREDENTIALS)
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """An S3 server speaking the real protocol (moto server mode)."""
    server = start_s3(tmp_path_factory.mktemp("s3"))
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture
def s3_store_url(s3_server) -> str:
    """A fresh bucket and prefix, as a store URL."""
    bucket = f"liftoff-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(bucket)
    return f"s3://{bucket}/region-a?path_style=true"


@pytest.fixture
def file_store_url(tmp_path) -> str:
    return f"file://{tmp_path / 'store'}"


def run_cli(*args: str, env: dict | None = None, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `liftoff ARGS` as a separate process, as an operator would."""
    done = subprocess.run(
        [sys.executable, "-m", "liftoff", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        cwd=ROOT,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"liftoff {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture
def aws_credentials(monkeypatch) -> None:
    """Dummy AWS credentials and region in the environment (servers on loopback that do not check them)."""
    for name, value in {"AWS_ACCESS_KEY_ID": "liftoff", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
