"""The deployment material in deploy/ is well-formed and only uses commands and flags that exist."""

from __future__ import annotations

import configparser
import inspect
import re
import shlex
import tomllib

import yaml

from layerstore.cli import build_parser
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"


PLACEHOLDERS = {"STORE": "s3://bucket/a", "STORE_FALLBACK": "s3://bucket/b", "CACHE_SIZE": "1G"}


def parses_as_liftoff(argv: list[str]) -> None:
    """Fail (argparse exits) unless `liftoff ARGV` is a valid command line; $(VAR) references get placeholders."""
    argv = [re.sub(r"\$\((\w+)\)", lambda m: PLACEHOLDERS[m.group(1)], arg) for arg in argv]
    build_parser(argv).parse_args(argv)


def k8s_documents() -> list[dict]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_kubernetes_manifests():
    docs = k8s_documents()
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ConfigMap", "DaemonSet", "ServiceAccount", "RayService"} <= kinds
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"]
    daemonset = next(d for d in docs if d["kind"] == "DaemonSet")
    containers = daemonset["spec"]["template"]["spec"]["containers"]
    assert {c["name"] for c in containers} == {"fused", "snapshotter"}
    for container in containers:
        assert container["command"] == ["liftoff"]
        parses_as_liftoff(container["args"])
        assert container["securityContext"]["privileged"] is True
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/var/lib/liftoff"]["mountPropagation"] == "Bidirectional"  # FUSE mounts reach the host


def test_store_gc_cronjob():
    job = next(d for d in k8s_documents() if d["kind"] == "CronJob")
    assert job["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["liftoff"] and container["args"][0] == "gc"
    parses_as_liftoff(container["args"])


def test_containerd_config_and_hosts_toml():
    config_map = next(d for d in k8s_documents() if d["kind"] == "ConfigMap")
    containerd = tomllib.loads(config_map["data"]["containerd-liftoff.toml"])
    assert containerd["proxy_plugins"]["liftoff"] == {"type": "snapshot", "address": "/run/liftoff/snapshotter.sock"}
    assert containerd["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["snapshotter"] == "liftoff"
    for text in (config_map["data"]["hosts.toml"], (DEPLOY / "hosts.toml").read_text()):
        hosts = tomllib.loads(text)
        assert hosts["server"].startswith("https://")
        assert all(h["capabilities"] == ["pull", "resolve"] for h in hosts["host"].values())


def test_systemd_units_run_real_commands():
    for path in sorted(DEPLOY.glob("*.service")):
        unit = configparser.ConfigParser(strict=False, interpolation=None)
        unit.optionxform = str
        unit.read(path)
        argv = shlex.split(unit["Service"]["ExecStart"])
        assert argv[0].endswith("/liftoff"), path
        parses_as_liftoff(argv[1:])
    fused = configparser.ConfigParser(strict=False, interpolation=None)
    fused.optionxform = str
    fused.read(DEPLOY / "liftoff-fused.service")
    assert fused["Service"]["KillMode"] == "process"


def test_rayservice_application_builder():
    from serve_integration import apps

    service = next(d for d in k8s_documents() if d["kind"] == "RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    for application in serve_config["applications"]:
        module, _, name = application["import_path"].partition(":")
        assert module == "serve_integration.apps"
        builder = getattr(apps, name)
        assert list(inspect.signature(builder).parameters) == ["args"]
        apps._options(application["args"])  # every arg is one the builder knows
