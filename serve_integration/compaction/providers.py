"""Who gets an emptied node back: the node-provider interface and its implementations.

The executor calls `release(node)` once a drained node holds no Serve replica. What happens next is
the provider's business:

- `ray`: the Ray autoscaler. A node drained with reason PREEMPTION shuts its raylet down by itself
  as soon as it is idle (death reason AUTOSCALER_DRAIN_PREEMPTED); the autoscaler then terminates
  the instance. Release only waits for the node to leave the GCS's alive set.
- `kuberay`: scale the worker group of a RayCluster down by exactly that pod (the
  `scaleStrategy.workersToDelete` list, as Ray's own KubeRay node provider does).
- `command`: run an operator-supplied command per node (`{node_id}`, `{address}`, `{node_type}`).
- `cluster-utils`: remove a node of a `ray.cluster_utils.Cluster` (local clusters and tests).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from serve_integration.compaction.cluster import ClusterError, RayCluster
from serve_integration.compaction.model import Node

log = logging.getLogger(__name__)


class NodeProvider(ABC):
    """Takes emptied nodes back. `release` must be idempotent: a restarted controller may call it again."""

    name = "provider"

    @abstractmethod
    def release(self, node: Node, cluster: RayCluster) -> None:
        """Hand an empty, draining node back."""

    def wait_released(self, node_id: str, cluster: RayCluster, timeout_s: float) -> bool:
        """Wait until the node has left the cluster; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if node_id not in cluster.alive_nodes():
                return True
            time.sleep(0.5)
        return node_id not in cluster.alive_nodes()


class RayAutoscalerProvider(NodeProvider):
    """The drained raylet exits once idle; the Ray autoscaler (v1 or v2) then terminates the instance."""

    name = "ray"

    def release(self, node: Node, cluster: RayCluster) -> None:
        log.info("node %s: drained and empty; its raylet exits and the autoscaler terminates the instance", node.node_id[:12])


class CommandProvider(NodeProvider):
    """Runs an operator command per released node, e.g. a cloud CLI call that deletes the instance."""

    name = "command"

    def __init__(self, template: str, timeout_s: float = 300.0):
        if not template:
            raise ClusterError("--provider command needs --release-command 'CMD {node_id} {address} {node_type}'")
        self.template = template
        self.timeout_s = timeout_s

    def release(self, node: Node, cluster: RayCluster) -> None:
        argv = [
            a.format(node_id=node.node_id, address=node.address, node_type=node.node_type) for a in shlex.split(self.template)
        ]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout_s)
        if done.returncode != 0:
            raise ClusterError(
                f"release command for node {node.node_id[:12]} failed ({done.returncode}): {done.stderr.strip()[-300:]}"
            )


def kuberay_scale_down(cr: dict, group: str, pod: str) -> dict:
    """The RayCluster spec with one pod of a worker group scheduled for deletion (pure, for testing)."""
    spec = json.loads(json.dumps(cr["spec"]))
    for g in spec.get("workerGroupSpecs", []):
        if g.get("groupName") != group:
            continue
        strategy = g.setdefault("scaleStrategy", {})
        doomed = strategy.setdefault("workersToDelete", [])
        if pod not in doomed:
            doomed.append(pod)
            g["replicas"] = max(int(g.get("minReplicas", 0)), int(g.get("replicas", 0)) - 1)
        return spec
    raise ClusterError(
        f"RayCluster has no worker group {group!r} (groups: {[g.get('groupName') for g in spec.get('workerGroupSpecs', [])]})"
    )


class KubeRayProvider(NodeProvider):
    """Scales the pod's worker group down through the Kubernetes API (in-cluster service account)."""

    name = "kuberay"
    TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    CA = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"

    def __init__(self, cluster_name: str, namespace: str | None = None, api: str | None = None):
        if not cluster_name:
            raise ClusterError("--provider kuberay needs --kuberay-cluster NAME (the RayCluster resource)")
        self.cluster_name = cluster_name
        self.namespace = namespace or _service_account_namespace()
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        self.api = api or (f"https://{host}:{port}" if host else "")
        if not self.api:
            raise ClusterError(
                "--provider kuberay runs inside the cluster (KUBERNETES_SERVICE_HOST is unset); pass --kuberay-api URL"
            )

    def _session(self) -> Any:
        import requests

        s = requests.Session()
        if os.path.exists(self.TOKEN):
            with open(self.TOKEN) as f:
                s.headers["Authorization"] = f"Bearer {f.read().strip()}"
            s.verify = self.CA if os.path.exists(self.CA) else True
        return s

    def release(self, node: Node, cluster: RayCluster) -> None:
        group = node.labels.get("ray.io/node-group") or node.node_type
        info = cluster.node_infos().get(node.node_id)
        pod = getattr(info, "node_manager_hostname", "") if info is not None else ""
        if not group or not pod:
            raise ClusterError(f"node {node.node_id[:12]} has no KubeRay worker group label or pod hostname")
        url = f"{self.api}/apis/ray.io/v1/namespaces/{self.namespace}/rayclusters/{self.cluster_name}"
        s = self._session()
        for _ in range(5):
            got = s.get(url, timeout=30)
            if got.status_code != 200:
                raise ClusterError(
                    f"cannot read RayCluster {self.namespace}/{self.cluster_name}: HTTP {got.status_code} {got.text[:200]}"
                )
            cr = got.json()
            body = {
                "apiVersion": cr["apiVersion"],
                "kind": cr["kind"],
                "metadata": cr["metadata"],
                "spec": kuberay_scale_down(cr, group, pod),
            }
            put = s.put(url, json=body, timeout=30)
            if put.status_code == 409:  # someone else changed it: read again
                continue
            if put.status_code >= 300:
                raise ClusterError(f"cannot scale down RayCluster {self.cluster_name}: HTTP {put.status_code} {put.text[:200]}")
            return
        raise ClusterError(f"RayCluster {self.cluster_name} kept changing under us; try again")


def _service_account_namespace() -> str:
    path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    if os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    return "default"


class ClusterUtilsProvider(NodeProvider):
    """Removes nodes of a `ray.cluster_utils.Cluster` started in this process (local clusters, tests)."""

    name = "cluster-utils"

    def __init__(self, cluster: Any):
        self.cluster = cluster
        self.released: list[str] = []

    def release(self, node: Node, cluster: RayCluster) -> None:
        for n in list(self.cluster.worker_nodes):
            if n.node_id == node.node_id:
                self.cluster.remove_node(n, allow_graceful=True)
                self.released.append(node.node_id)
                return
        if node.node_id in self.released:
            return
        raise ClusterError(f"node {node.node_id[:12]} is not a worker of this ray.cluster_utils.Cluster")


_FACTORIES: dict[str, Callable[[Any], NodeProvider]] = {
    "ray": lambda args: RayAutoscalerProvider(),
    "command": lambda args: CommandProvider(getattr(args, "release_command", "") or ""),
    "kuberay": lambda args: KubeRayProvider(
        getattr(args, "kuberay_cluster", "") or "", getattr(args, "kuberay_namespace", None), getattr(args, "kuberay_api", None)
    ),
}


def register_provider(name: str, factory: Callable[[Any], NodeProvider]) -> None:
    """Make a provider selectable by name (`--provider NAME`); e.g. a ClusterUtilsProvider in a test process."""
    _FACTORIES[name] = factory


def unregister_provider(name: str) -> None:
    _FACTORIES.pop(name, None)


def make_provider(name: str, args: Any = None) -> NodeProvider:
    if name not in _FACTORIES:
        raise ClusterError(f"unknown node provider {name!r}: choose one of {', '.join(sorted(_FACTORIES))}")
    return _FACTORIES[name](args)


def provider_names() -> list[str]:
    return sorted(_FACTORIES)
