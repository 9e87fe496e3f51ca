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


BASES = ("namespace", "node", "proxy", "compaction")


def base_documents(base: str) -> list[dict]:
    """The documents a kustomize base lists (its `resources:` files, read here without kustomize)."""
    directory = DEPLOY / "k8s" / "base" / base
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((directory / name).read_text()) if d]
    return docs


def k8s_documents() -> list[dict]:
    """Every base's documents, the examples beside them (deploy/k8s/*.yaml) and the cleanup Job (deploy/k8s/cleanup)."""
    docs = [d for base in BASES for d in base_documents(base)]
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")) + sorted((DEPLOY / "k8s" / "cleanup").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def named(kind: str, name: str, docs: list[dict] | None = None) -> dict:
    """The document of that kind whose name (or generateName) is `name`."""
    return next(
        d
        for d in (docs or k8s_documents())
        if d["kind"] == kind and name in (d["metadata"].get("name"), d["metadata"].get("generateName"))
    )


def test_kubernetes_manifests():
    docs = k8s_documents()
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ConfigMap", "DaemonSet", "ServiceAccount", "RayService", "Deployment", "Service"} <= kinds
    assert {"PodDisruptionBudget", "Role", "RoleBinding", "CronJob"} <= kinds
    for doc in docs:
        assert doc["apiVersion"] and (doc["metadata"].get("name") or doc["metadata"].get("generateName"))
    daemonset = named("DaemonSet", "liftoff-node", docs)
    containers = daemonset["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["fused", "snapshotter", "install"]
    containers = containers[:2]  # the daemons (install: test_node_daemonset_installs_and_uninstalls_liftoff)
    config_map = named("ConfigMap", "liftoff-node", docs)
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


def test_hosts_toml():
    """No containerd config drop-in is shipped any more (`liftoff node install` merges the settings); hosts.toml is."""
    config_map = named("ConfigMap", "liftoff-node")
    assert set(config_map["data"]) == {"STORE", "config.toml", "hosts.toml"}
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


# -- kustomize bases, schema, the proxy Service, compaction RBAC, images ------------------------------------

KUSTOMIZATIONS = [f"base/{b}" for b in BASES] + ["overlays/example"]


def kustomize(path: str) -> list[dict]:
    """`kubectl kustomize deploy/k8s/PATH` (offline: it renders, it never talks to a cluster)."""
    import shutil
    import subprocess

    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render the kustomize bases: apt-get install kubernetes-client (scripts/bootstrap)"
    done = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s" / path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {path}: {done.stderr.strip()}"
    return [d for d in yaml.safe_load_all(done.stdout) if d]


# apiVersion of each kind we ship; namespaced or not
KINDS = {
    "Namespace": ("v1", False),
    "ConfigMap": ("v1", True),
    "ServiceAccount": ("v1", True),
    "Service": ("v1", True),
    "DaemonSet": ("apps/v1", True),
    "Deployment": ("apps/v1", True),
    "CronJob": ("batch/v1", True),
    "Job": ("batch/v1", True),
    "PodDisruptionBudget": ("policy/v1", True),
    "Role": ("rbac.authorization.k8s.io/v1", True),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", True),
}
NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def pod_spec(doc: dict) -> dict | None:
    if doc["kind"] in ("DaemonSet", "Deployment"):
        return doc["spec"]["template"]["spec"]
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if doc["kind"] == "Job":
        return doc["spec"]["template"]["spec"]
    return None


def schema_problems(doc: dict, namespaced_expected: bool = True) -> list[str]:
    """What a small, offline schema check finds wrong with one rendered document (apiVersion per kind, names,
    namespaces, selectors matching their pod labels, containers, volumes and ports referenced by name)."""
    problems: list[str] = []
    kind, meta = doc.get("kind"), doc.get("metadata") or {}
    where = f"{kind}/{meta.get('name')}"
    if kind not in KINDS:
        return [f"{where}: unknown kind"]
    api, namespaced = KINDS[kind]
    if doc.get("apiVersion") != api:
        problems.append(f"{where}: apiVersion {doc.get('apiVersion')} (want {api})")
    name = meta.get("name") or (meta.get("generateName") or "").rstrip("-")  # generateName: `kubectl create` adds 5
    if not NAME.match(name) or len(name) > 63 - (0 if meta.get("name") else 6):
        problems.append(f"{where}: bad name")
    if namespaced and namespaced_expected and not meta.get("namespace"):
        problems.append(f"{where}: no namespace")
    spec = doc.get("spec") or {}
    if kind in ("DaemonSet", "Deployment"):
        labels = spec["template"]["metadata"]["labels"]
        if not spec.get("selector", {}).get("matchLabels") or spec["selector"]["matchLabels"].items() - labels.items():
            problems.append(f"{where}: selector does not match the pod's labels")
    if kind == "Service" and (not spec.get("selector") or not spec.get("ports")):
        problems.append(f"{where}: a Service needs a selector and ports")
    if kind == "PodDisruptionBudget" and not spec.get("selector", {}).get("matchLabels"):
        problems.append(f"{where}: no selector")
    pod = pod_spec(doc)
    if pod is not None:
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for c in pod.get("initContainers", []) + pod["containers"]:
            if not c.get("name") or not c.get("image"):
                problems.append(f"{where}: a container without name or image")
            ports = {p["name"] for p in c.get("ports", []) if "name" in p}
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    problems.append(f"{where}/{c['name']}: mounts undefined volume {m['name']}")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = (c.get(probe) or {}).get("httpGet", {}).get("port")
                if isinstance(port, str) and port not in ports:
                    problems.append(f"{where}/{c['name']}: {probe} names no port of the container: {port}")
    return problems


def test_schema_check_finds_problems():
    """The check itself: a broken document is reported (so a clean result means something)."""
    deployment = named("Deployment", "liftoff-proxy")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["apiVersion"] = "extensions/v1beta1"
    broken["spec"]["selector"]["matchLabels"] = {"app": "other"}
    broken["spec"]["template"]["spec"]["containers"][0]["volumeMounts"].append({"name": "nope", "mountPath": "/x"})
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = "metrics"
    assert len(schema_problems(broken)) == 4
    assert schema_problems(deployment) == []


def test_kustomize_renders_every_base_and_the_overlay():
    """`kubectl kustomize` renders each base and the example overlay; every rendered document passes the schema
    check; a base renders exactly the documents its files hold, in the namespace it names."""
    for path in KUSTOMIZATIONS:
        docs = kustomize(path)
        assert docs, path
        problems = [p for d in docs for p in schema_problems(d, namespaced_expected=path != "base/compaction")]
        assert problems == [], path
        if path.startswith("base/"):
            ids = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
            assert ids == sorted((d["kind"], d["metadata"]["name"]) for d in base_documents(path[5:])), path
    overlay = kustomize("overlays/example")
    pods = [pod_spec(d) for d in overlay if pod_spec(d)]
    images = {c["image"] for pod in pods for c in pod["containers"] + pod.get("initContainers", [])}
    assert images == {"registry.example.com/platform/liftoff:0.1.0", "registry.example.com/platform/liftoff:0.1.0-compact"}
    assert {d["metadata"]["namespace"] for d in overlay if d["kind"] == "Deployment"} == {"liftoff-system", "serving"}
    stores = tomllib.loads(named("ConfigMap", "liftoff-node", overlay)["data"]["config.toml"])["store"]["urls"]
    assert stores[0] == "s3://example-liftoff-eu-west-1/liftoff"


def test_images_are_what_scripts_image_builds():
    """Every liftoff container runs localhost/liftoff:VERSION (scripts/image's default name; -compact with Ray)."""
    from layerstore import __version__

    text = (ROOT / "scripts" / "image").read_text()
    assert 'DEFAULT_NAME = f"localhost/liftoff:{__version__}"' in text
    for doc in k8s_documents():
        pod = pod_spec(doc)
        for c in (pod or {}).get("containers", []) + (pod or {}).get("initContainers", []):
            want = f"localhost/liftoff:{__version__}" + (
                "-compact" if doc["metadata"].get("name") == "liftoff-compaction" else ""
            )
            assert c["image"] == want, (doc["metadata"]["name"], c["name"])


def test_proxy_service_is_what_the_nodes_reach():
    """hosts.toml's mirror URL is the proxy Service's DNS name and port; the Service reaches the container's
    listen port; the PodDisruptionBudget covers the Deployment's pods; the node's init swaps in the ClusterIP."""
    from urllib.parse import urlsplit

    docs = k8s_documents()
    hosts = tomllib.loads(named("ConfigMap", "liftoff-node", docs)["data"]["hosts.toml"])
    (url,) = hosts["host"]
    parts = urlsplit(url)
    name, namespace, svc = parts.hostname.split(".")
    assert svc == "svc"
    service = named("Service", name, docs)
    assert service["metadata"]["namespace"] == namespace
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == parts.port]
    deployment = named("Deployment", name, docs)
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    config_map = named("ConfigMap", "liftoff-proxy", docs)
    args = parses_as_liftoff(container["args"], config_map["data"]["config.toml"])
    assert args.command == "proxy"
    container_port = next(p["containerPort"] for p in container["ports"] if p["name"] == port["targetPort"])
    assert args.listen.rpartition(":")[2] == str(container_port)
    pdb = named("PodDisruptionBudget", name, docs)
    assert pdb["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    inits = pod_spec(named("DaemonSet", "liftoff-node", docs))["initContainers"]
    init = next(c for c in inits if c["name"] == "registry-mirror")
    assert f"getent hosts {parts.hostname}" in " ".join(init["args"])


def test_fused_metrics_and_probes():
    """fused serves /metrics and /healthz on the port its probes use (metrics_address from its config file)."""
    docs = k8s_documents()
    fused = next(c for c in pod_spec(named("DaemonSet", "liftoff-node", docs))["containers"] if c["name"] == "fused")
    args = parses_as_liftoff(fused["args"], named("ConfigMap", "liftoff-node", docs)["data"]["config.toml"])
    port = next(p for p in fused["ports"] if p["name"] == fused["readinessProbe"]["httpGet"]["port"])
    assert args.metrics_address == f":{port['containerPort']}"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert fused[probe]["httpGet"]["path"] == "/healthz"


def test_compaction_controller_and_its_rbac():
    """`liftoff compact run` with the KubeRay provider reads and updates the RayCluster: the Role grants exactly that,
    bound to the Deployment's ServiceAccount."""
    docs = base_documents("compaction")
    deployment = named("Deployment", "liftoff-compaction", docs)
    pod = pod_spec(deployment)
    (container,) = pod["containers"]
    args = parses_as_liftoff(container["args"])
    assert (args.command, args.provider) == ("compact", "kuberay")
    role = named("Role", "liftoff-compaction", docs)
    (rule,) = role["rules"]
    assert (rule["apiGroups"], rule["resources"], sorted(rule["verbs"])) == (["ray.io"], ["rayclusters"], ["get", "update"])
    binding = named("RoleBinding", "liftoff-compaction", docs)
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"]}]
    assert deployment["spec"]["replicas"] == 1


def test_grafana_dashboard_uses_metrics_that_exist():
    """Every metric deploy/grafana/liftoff-nodes.json queries is one fused or the snapshotter exports."""
    import json

    dashboard = json.loads((DEPLOY / "grafana" / "liftoff-nodes.json").read_text())
    exported = set()
    for source in ("snapshotter/fused/metrics.py", "snapshotter/metrics.py"):
        exported |= set(re.findall(r'"(liftoff_[a-z_]+)"', (ROOT / source).read_text()))
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    queried = {name for expr in exprs for name in re.findall(r"liftoff_[a-z_]+", expr)}
    assert queried
    for name in queried:
        base = re.sub(r"_(total|bucket|count|sum)$", "", name)
        assert base in exported, name


# -- the node installer: `liftoff node install` in the DaemonSet, `liftoff node uninstall` in its preStop and the Job --

HOST_CONTAINERD = "/etc/containerd"


def host_path(pod: dict, container: dict, path: str) -> str | None:
    """The host path that `path` inside `container` is (through a hostPath volume), or None."""
    volumes = {v["name"]: v["hostPath"]["path"] for v in pod.get("volumes", []) if "hostPath" in v}
    for mount in sorted(container.get("volumeMounts", []), key=lambda m: -len(m["mountPath"])):
        if (path == mount["mountPath"] or path.startswith(mount["mountPath"] + "/")) and mount["name"] in volumes:
            return volumes[mount["name"]] + path[len(mount["mountPath"]) :]
    return None


def test_node_daemonset_installs_and_uninstalls_liftoff():
    """The DaemonSet's `install` container runs `liftoff node install` on the host's containerd config (mounted from
    /etc/containerd), waits for the snapshotter's socket at the path containerd dials, holds, and its preStop hook runs
    `liftoff node uninstall` on the same file; the pod shares the host's PID namespace (nsenter into PID 1) and its
    grace period covers the hook; hosts.toml lands in the directory install names as CRI's config_path."""
    from liftoff import node

    docs = k8s_documents()
    daemonset = named("DaemonSet", "liftoff-node", docs)
    pod = pod_spec(daemonset)
    assert pod["hostPID"] is True
    containers = {c["name"]: c for c in pod["containers"]}
    install = containers["install"]
    assert install["command"] == ["liftoff"] and install["args"][:2] == ["node", "install"]
    args = parses_as_liftoff(install["args"])
    assert (args.command, args.node_action, args.hold, args.dry_run, args.no_restart) == ("node", "install", True, False, False)
    assert args.restart_command is None  # restarted through nsenter into PID 1 (node.restart_plan)
    assert args.wait_for_socket >= 60
    assert host_path(pod, install, args.containerd_config) == f"{HOST_CONTAINERD}/config.toml"
    snapshotter = parses_as_liftoff(
        containers["snapshotter"]["args"], named("ConfigMap", "liftoff-node", docs)["data"]["config.toml"]
    )
    assert args.socket == snapshotter.socket  # what containerd dials on the host ...
    assert host_path(pod, install, args.socket) == args.socket  # ... is the same file in the installer
    assert host_path(pod, containers["snapshotter"], snapshotter.socket) == args.socket
    assert install["securityContext"]["privileged"] is True
    probe = install["readinessProbe"]["exec"]["command"]
    assert probe[-2:] == [args.socket, args.containerd_config]

    prestop = install["lifecycle"]["preStop"]["exec"]["command"]
    assert prestop[:3] == ["liftoff", "node", "uninstall"]
    undo = parses_as_liftoff(prestop[1:])
    assert (undo.containerd_config, undo.plugin_name, undo.no_restart) == (args.containerd_config, args.plugin_name, False)
    assert pod["terminationGracePeriodSeconds"] > 2 * undo.timeout  # a failed check restarts containerd a second time

    init = next(c for c in pod["initContainers"] if c["name"] == "registry-mirror")
    written = re.search(r"> (\S+/hosts.toml)", " ".join(init["args"])).group(1)
    assert host_path(pod, init, written) == f"{args.hosts_dir}/docker.io/hosts.toml"
    assert args.hosts_dir == node.DEFAULT_HOSTS_DIR

    job = named("Job", "liftoff-node-uninstall-", docs)
    job_pod = pod_spec(job)
    (container,) = job_pod["containers"]
    assert container["command"] == ["liftoff"]
    cleanup = parses_as_liftoff(container["args"])
    assert (cleanup.command, cleanup.node_action, cleanup.no_restart) == ("node", "uninstall", False)
    assert host_path(job_pod, container, cleanup.containerd_config) == f"{HOST_CONTAINERD}/config.toml"
    assert job_pod["hostPID"] is True and container["securityContext"]["privileged"] is True
    assert job_pod["nodeName"] == "NODE_NAME" and job_pod["restartPolicy"] == "Never"
    assert schema_problems(job) == []
    assert job["metadata"]["namespace"] == daemonset["metadata"]["namespace"]


def test_readme_deployment_section_names_what_exists():
    """README's deployment walk-through: the repository paths it names exist, its `liftoff` command lines parse,
    `scripts/image`'s options are real, and the cleanup Job's sed placeholders are in the Job's file."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Deployment (Kubernetes)") : text.index("## Benchmarks")]
    paths = set(re.findall(r"\b((?:deploy|scripts|tests)/[\w./-]+\w)", section))
    assert paths and all((ROOT / path).exists() for path in paths), [p for p in paths if not (ROOT / p).exists()]
    commands = [line.split("#")[0].strip() for line in section.splitlines() if line.startswith("liftoff ")]
    assert commands
    for line in commands:
        parses_as_liftoff(shlex.split(line)[1:])
    image = (ROOT / "scripts" / "image").read_text()
    for option in set(re.findall(r"scripts/image (--[\w-]+)", section)):
        assert f'"{option}"' in image, option
    job = (DEPLOY / "k8s" / "cleanup" / "liftoff-node-uninstall.yaml").read_text()
    for placeholder in re.findall(r's/([A-Za-z_/:]+?)/[^/]*/"', section) + re.findall(r"s#([\w/:]+)#", section):
        assert placeholder in job, placeholder
    assert "kubectl apply -k deploy/k8s/overlays/example" in section
