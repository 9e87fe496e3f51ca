"""Upstream auth: htpasswd basic credentials from the proxy's docker config, anonymous bearer tokens,
and clients' own credentials passed through only when configured (and then required for cached content too)."""

from __future__ import annotations

import base64
import json
import subprocess
from urllib.parse import parse_qs, urlsplit

import pytest

from liftoff.devstack.services import start_registry
from tests.conftest import REGISTRY_CREDENTIALS
from tests.converter.tokenauth import TokenServer
from tests.proxy.helpers import push_image, start_proxy, wait_cached


def docker_config(path, host: str, user: str, password: str) -> str:
    path.write_text(json.dumps({"auths": {host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}}}))
    return str(path)


@pytest.fixture(scope="module")
def private(auth_registry, tmp_path_factory):
    return push_image(
        auth_registry.host, tmp_path_factory.mktemp("private"), "private/app", [50_000], credentials=REGISTRY_CREDENTIALS
    )


def test_the_proxy_uses_its_docker_config_credentials(auth_registry, private, tmp_path):
    upstream = [(auth_registry.host, f"http://{auth_registry.host}")]
    without = start_proxy(tmp_path / "anonymous", upstream, "--docker-config", str(tmp_path / "none.json"))
    try:
        r = without.get(f"/v2/{private.repository}/manifests/{private.tag}")
        assert r.status_code == 403
        error = r.json()["errors"][0]
        assert error["code"] == "DENIED" and "none.json" in error["message"] and "docker login" in error["message"]
    finally:
        without.stop()
    config = docker_config(tmp_path / "config.json", auth_registry.host, *REGISTRY_CREDENTIALS)
    proxy = start_proxy(tmp_path / "credentialed", upstream, "--docker-config", config)
    try:
        out = tmp_path / "out"
        done = subprocess.run(
            [
                "skopeo",
                "copy",
                "--quiet",
                "--preserve-digests",
                "--src-tls-verify=false",
                f"docker://{proxy.host}/{private.repository}:v1",
                f"oci:{out}:v1",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        for digest, data in private.blobs.items():
            assert (out / "blobs" / "sha256" / digest.split(":")[1]).read_bytes() == data
    finally:
        proxy.stop()


def test_client_credentials_pass_through_only_when_configured(auth_registry, private, tmp_path):
    proxy = start_proxy(
        tmp_path / "pass",
        [(auth_registry.host, f"http://{auth_registry.host}")],
        "--pass-credentials",
        auth_registry.host,
        "--docker-config",
        str(tmp_path / "none.json"),
    )
    try:
        base = proxy.get("/v2/")
        assert base.status_code == 401 and base.headers["WWW-Authenticate"].startswith("Basic realm=")
        path = private.blob_path(private.layer_digests[0])
        anonymous = proxy.get(path)
        assert anonymous.status_code == 401 and anonymous.json()["errors"][0]["code"] == "UNAUTHORIZED"
        assert "Basic" in anonymous.headers["WWW-Authenticate"]
        wrong = proxy.get(path, auth=("liftoff", "wrong"))
        assert wrong.status_code == 401
        right = proxy.get(path, auth=REGISTRY_CREDENTIALS)
        assert right.status_code == 200 and right.content == private.blobs[private.layer_digests[0]]
        wait_cached(proxy, [private.layer_digests[0]])
        # cached now, but still not for clients the upstream would refuse
        assert proxy.get(path).status_code == 401
        assert proxy.get(path, auth=("liftoff", "wrong")).status_code == 401
        assert proxy.get(path, auth=REGISTRY_CREDENTIALS).content == private.blobs[private.layer_digests[0]]
    finally:
        proxy.stop()


def test_anonymous_bearer_tokens(tmp_path):
    tokens = TokenServer(tmp_path)
    registry = start_registry(tmp_path / "registry", auth_config=tokens.registry_auth_config())
    proxy = None
    try:
        image = push_image(registry.host, tmp_path, "public/app", [20_000])  # skopeo gets its own (grant-all) token
        proxy = start_proxy(tmp_path / "proxy", [(registry.host, f"http://{registry.host}")])
        tokens.requests.clear()
        r = proxy.get(f"/v2/{image.repository}/manifests/v1")
        assert r.status_code == 200 and r.content == image.manifest
        blob = proxy.get(image.blob_path(image.layer_digests[0]))
        assert blob.status_code == 200 and blob.content == image.blobs[image.layer_digests[0]]
        # one token, reused for the blob until it expires
        scopes = [parse_qs(urlsplit(q).query)["scope"] for q in tokens.requests]
        assert scopes == [["repository:public/app:pull"]]
    finally:
        if proxy is not None:
            proxy.stop()
        registry.stop()
        tokens.stop()
