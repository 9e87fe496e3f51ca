"""Registry access as docker does it: basic credentials, anonymous bearer tokens, clear failures."""

from __future__ import annotations

import base64
import json

import pytest

from liftoff.devstack.ocibuild import LayoutWriter, Member, make_tar
from liftoff.devstack.services import push_layout, start_registry
from tests.conftest import REGISTRY_CREDENTIALS, run_cli
from tests.converter.tokenauth import TokenServer


@pytest.fixture(scope="module")
def small_layout(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    writer = LayoutWriter(root)
    writer.tag(writer.add_image([make_tar([Member("hello", data=b"hello\n")])]), "v1")
    return root


def docker_config(tmp_path, host: str, user: str, password: str) -> str:
    path = tmp_path / "docker" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"auths": {host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}}}))
    return str(path)


def test_basic_auth_from_docker_config(auth_registry, small_layout, tmp_path, file_store_url):
    ref = push_layout(small_layout, "v1", auth_registry.host, "private/app", credentials=REGISTRY_CREDENTIALS)
    anonymous = run_cli(
        "convert", ref, "--plain-http", "--store", file_store_url, "--docker-config", str(tmp_path / "none.json"), check=False
    )
    assert anonymous.returncode == 1
    assert "401 Unauthorized" in anonymous.stderr and "docker login" in anonymous.stderr
    assert len(anonymous.stderr.strip().splitlines()) == 1
    config = docker_config(tmp_path, auth_registry.host, *REGISTRY_CREDENTIALS)
    run_cli("convert", ref, "--plain-http", "--store", file_store_url, "--docker-config", config)
    # DOCKER_CONFIG (a directory), as docker reads it
    run_cli("convert", ref, "--plain-http", "--store", f"{file_store_url}-2", env={"DOCKER_CONFIG": str(tmp_path / "docker")})
    (tmp_path / "wrong").mkdir()
    wrong = docker_config(tmp_path / "wrong", auth_registry.host, "liftoff", "wrong")
    bad = run_cli("convert", ref, "--plain-http", "--store", f"{file_store_url}-3", "--docker-config", wrong, check=False)
    assert bad.returncode == 1 and "401" in bad.stderr


def test_anonymous_bearer_token_flow(tmp_path, small_layout, file_store_url):
    tokens = TokenServer(tmp_path)
    registry = start_registry(tmp_path / "registry", auth_config=tokens.registry_auth_config())
    try:
        ref = push_layout(small_layout, "v1", registry.host, "public/app")
        tokens.requests.clear()
        run_cli("convert", ref, "--plain-http", "--store", file_store_url)
        assert tokens.requests, "the converter never asked the token service"
        assert all("scope=repository%3Apublic%2Fapp%3Apull" in r for r in tokens.requests)
        run_cli("verify", ref, "--store", file_store_url, "--source", ref, "--plain-http")
    finally:
        registry.stop()
        tokens.stop()


def test_unreachable_and_missing(registry, file_store_url, small_layout):
    down = run_cli("convert", "127.0.0.1:9/app:v1", "--plain-http", "--store", file_store_url, check=False)
    assert down.returncode == 1 and "unreachable" in down.stderr and "Connection refused" in down.stderr
    missing = run_cli("convert", f"{registry.host}/no/such:tag", "--plain-http", "--store", file_store_url, check=False)
    assert missing.returncode == 1 and "not found" in missing.stderr and "no/such:tag" in missing.stderr
    tls = run_cli("convert", f"{registry.host}/no/such:tag", "--store", file_store_url, check=False)
    assert tls.returncode == 1 and "--plain-http" in tls.stderr


def test_unreachable_store_writes_nothing(small_layout, tmp_path):
    done = run_cli(
        "convert",
        f"oci:{small_layout}:v1",
        "--store",
        "s3://bucket-x/p?path_style=true&endpoint_url=http://127.0.0.1:9",
        check=False,
        env={"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_MAX_ATTEMPTS": "1"},
    )
    assert done.returncode == 1 and "unreachable" in done.stderr and "127.0.0.1:9" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
