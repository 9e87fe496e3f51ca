"""The deployment material in deploy/ is well-formed and only uses commands and flags that exist."""

from __future__ import annotations

import argparse
import configparser
import inspect
import re
import shlex
import tomllib

import yaml

from liftoff import config
from liftoff.cli import COMMANDS, build_parser
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"


PLACEHOLDERS = {"STORE": "s3://bucket/a", "STORE_FALLBACK": "s3://bucket/b", "CACHE_SIZE": "1G"}


def parses_as_liftoff(argv: list[str], config_text: str | None = None) -> argparse.Namespace:
    """Fail (argparse exits, or a usage error) unless `liftoff ARGV` is a valid command line with `config_text` as its
    configuration file (deploy/config.toml where argv names /etc/liftoff/config.toml); $(VAR) references get
    placeholders. Returns the parsed options, with the file's values."""
    argv = [re.sub(r"\$\((\w+)\)", lambda m: PLACEHOLDERS[m.group(1)], arg) for arg in argv]
    if config_text is None and "/etc/liftoff/config.toml" in argv:
        config_text = (DEPLOY / "config.toml").read_text()
    data = tomllib.loads(config_text) if config_text is not None else {}
    settings = config.Settings("/etc/liftoff/config.toml", data, {}, set(COMMANDS))
    with config.active(settings):
        args = build_parser(argv).parse_args(argv)
    settings.resolve(args)
    return args


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
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    for container in containers:
        assert container["command"] == ["liftoff"]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        text = config_map["data"]["config.toml"] if env.get("LIFTOFF_CONFIG") == "/etc/liftoff/config.toml" else None
        if text is not None:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts["/etc/liftoff"] == "config"
        args = parses_as_liftoff(container["args"], text)
        if args.command in ("fused", "snapshotter"):
            assert args.store == ["s3://liftoff-store-us-east-1/liftoff", "s3://liftoff-store-us-west-2/liftoff"]
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
        args = parses_as_liftoff(argv[1:])
        assert args.store == ["s3://YOUR-BUCKET/liftoff"], path  # from deploy/config.toml
    fused = configparser.ConfigParser(strict=False, interpolation=None)
    fused.optionxform = str
    fused.read(DEPLOY / "liftoff-fused.service")
    assert fused["Service"]["KillMode"] == "process"
    # its views' FUSE connections outlive it in the unit's fd store (the daemon sends READY=1 and FDSTORE=1)
    assert fused["Service"]["Type"] == "notify"
    assert int(fused["Service"]["FileDescriptorStoreMax"]) >= 1024


def test_fd_holder_keeps_the_daemons_connections():
    """Under Kubernetes the FUSE daemon hands its connections to liftoff fdholder, a DaemonSet of its own
    that is never rolled with liftoff-node, on a hostPath socket both mount."""
    sets = {d["metadata"]["name"]: d for d in k8s_documents() if d["kind"] == "DaemonSet"}
    holder = sets["liftoff-fdholder"]
    assert holder["spec"]["updateStrategy"]["type"] == "OnDelete"
    (container,) = holder["spec"]["template"]["spec"]["containers"]
    parses_as_liftoff(container["args"])
    socket = _flag(container["args"], "--socket")
    fused = next(c for c in sets["liftoff-node"]["spec"]["template"]["spec"]["containers"] if c["name"] == "fused")
    assert _flag(fused["args"], "--fd-holder") == socket
    for pod, c in ((holder, container), (sets["liftoff-node"], fused)):
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v["hostPath"]["path"] for v in pod["spec"]["template"]["spec"]["volumes"] if "hostPath" in v}
        assert any(socket.startswith(path + "/") and volumes[name] == path for name, path in mounts.items()), c["name"]


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


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_daemonset_makes_the_state_private_before_liftoff_starts(tmp_path):
    """The init step, run for real on a stand-in host (hostPath directories made 0755 as kubelet does,
    one of them missing): the snapshotter's root, the FUSE daemon's root and the socket directory end 0700."""
    import os
    import stat
    import subprocess

    pod = next(d for d in k8s_documents() if d["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    init = next(c for c in pod["initContainers"] if c["name"] == "private-state")
    assert pod["initContainers"][0] is init, "it runs before anything else"
    host = tmp_path / "host"
    script = " ".join(init["args"])
    for mount in init["volumeMounts"]:
        script = script.replace(mount["mountPath"], f"{host}{mount['mountPath']}")
    (host / "var/lib/liftoff").mkdir(parents=True, mode=0o755)
    os.chmod(host / "var/lib/liftoff", 0o755)
    subprocess.run([*init["command"], script], check=True)
    containers = {c["name"]: c for c in pod["containers"]}
    fused_root = _flag(containers["fused"]["args"], "--root")
    snapshotter_root = _flag(containers["snapshotter"]["args"], "--root")
    socket_dir = _flag(containers["snapshotter"]["args"], "--socket").rsplit("/", 1)[0]
    assert fused_root.startswith(snapshotter_root + "/")
    for path in (fused_root, snapshotter_root, socket_dir):
        assert stat.S_IMODE(os.stat(f"{host}{path}").st_mode) == 0o700, path


def test_systemd_units_keep_the_state_private():
    """Every liftoff root and socket directory is a State/RuntimeDirectory of its unit with mode 0700."""
    checked = 0
    for path in sorted(DEPLOY.glob("*.service")):
        unit = configparser.ConfigParser(strict=False, interpolation=None)
        unit.optionxform = str
        unit.read(path)
        service = unit["Service"]
        argv = shlex.split(service["ExecStart"])
        if parses_as_liftoff(argv[1:]).command not in ("snapshotter", "fused"):
            continue
        private = {f"/var/lib/{d}" for d in service.get("StateDirectory", "").split() if service["StateDirectoryMode"] == "0700"}
        private |= {f"/run/{d}" for d in service.get("RuntimeDirectory", "").split() if service["RuntimeDirectoryMode"] == "0700"}
        assert _flag(argv, "--root") in private, path
        if "--socket" in argv:
            assert _flag(argv, "--socket").rsplit("/", 1)[0] in private, path
        checked += 1
    assert checked == 2
