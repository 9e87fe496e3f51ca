"""A real multi-node Ray cluster on loopback with Serve, fake GPUs and HTTP load, for the live tests.

Kept small for a 2-core machine: 1 CPU per node, replicas ask for no CPU, one HTTP proxy on the
head, no dashboard. Every cluster is torn down in `stop()`, which also kills what it started.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")

EXPENSIVE = {"liftoff.io/price-per-hour": "8", "ray.io/accelerator-type": "H100", "ray.io/node-group": "h100x2"}
CHEAP = {"liftoff.io/price-per-hour": "2", "ray.io/accelerator-type": "L4", "ray.io/node-group": "l4x4"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], object], timeout: float, what: str, poll: float = 0.5) -> object:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


class LiveCluster:
    """A ray.cluster_utils.Cluster with Serve on it."""

    def __init__(self, runtime_env: dict | None = None):
        import ray
        from ray.cluster_utils import Cluster

        self.port = free_port()
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 1,
                "num_gpus": 0,
                "include_dashboard": False,
                "labels": {"liftoff.io/price-per-hour": "0.5"},
            },
        )
        self.nodes: dict[str, object] = {}  # name -> ray._private.node.Node
        ray.init(address=self.cluster.address, log_to_driver=False, runtime_env=runtime_env or None, namespace="liftoff-tests")
        from ray import serve

        serve.start(http_options={"host": "127.0.0.1", "port": self.port, "location": "HeadOnly"})

    @property
    def address(self) -> str:
        return self.cluster.address

    def add(self, name: str, gpus: int, labels: dict[str, str]) -> str:
        node = self.cluster.add_node(num_cpus=1, num_gpus=gpus, labels=dict(labels), resources={f"node_{name}": 1})
        self.cluster.wait_for_nodes()
        self.nodes[name] = node
        return node.node_id

    def node_id(self, name: str) -> str:
        return self.nodes[name].node_id

    def name_of(self, node_id: str) -> str:
        return next((n for n, node in self.nodes.items() if node.node_id == node_id), node_id[:8])

    def serve_details(self) -> dict:
        import ray
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        return ray.get(ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE).get_serve_instance_details.remote())

    def placement(self) -> dict[str, list[str]]:
        """node name -> deployment names of its replicas (any state)."""
        out: dict[str, list[str]] = {}
        for app in self.serve_details()["applications"].values():
            for dep_name, dep in app["deployments"].items():
                for r in dep["replicas"]:
                    if r.get("node_id"):
                        out.setdefault(self.name_of(r["node_id"]), []).append(dep_name)
        return {k: sorted(v) for k, v in out.items()}

    def running(self) -> dict[str, int]:
        """deployment -> RUNNING replicas."""
        out: dict[str, int] = {}
        for app in self.serve_details()["applications"].values():
            for dep_name, dep in app["deployments"].items():
                out[dep_name] = sum(1 for r in dep["replicas"] if str(getattr(r["state"], "value", r["state"])) == "RUNNING")
        return out

    def settled(self, targets: dict[str, int]) -> bool:
        """Every deployment HEALTHY with exactly its target RUNNING and nothing else."""
        for app in self.serve_details()["applications"].values():
            for dep_name, dep in app["deployments"].items():
                states = [str(getattr(r["state"], "value", r["state"])) for r in dep["replicas"]]
                status = str(getattr(dep["status"], "value", dep["status"]))
                want = targets.get(dep_name, dep["target_num_replicas"])
                if status != "HEALTHY" or states.count("RUNNING") != want or len(states) != want:
                    return False
        return True

    def alive(self) -> set[str]:
        import ray

        return {n["NodeID"] for n in ray.nodes() if n["Alive"]}

    def raylet_pids(self) -> list[int]:
        import ray

        nodes = [self.cluster.head_node, *self.cluster.worker_nodes]
        pids = []
        for node in nodes:
            if node is None:
                continue
            for info in node.all_processes.get(ray._private.ray_constants.PROCESS_TYPE_RAYLET, []):
                pids.append(info.process.pid)
        return pids

    def stop(self) -> None:
        """Shut Serve and every node down; fail if a raylet of this cluster outlives it."""
        import ray
        from ray import serve

        pids = self.raylet_pids()
        try:
            serve.shutdown()
        except Exception:  # the cluster may already be broken; still tear it down
            pass
        ray.shutdown()
        self.cluster.shutdown()
        wait_for(lambda: not [p for p in pids if _running(p)], 30, f"raylets {pids} to exit")


def _running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


@dataclass
class LoadLoop:
    """Bounded HTTP load on 127.0.0.1: `threads` workers cycling through routes until stopped."""

    port: int
    routes: list[str]
    threads: int = 2
    pause_s: float = 0.02
    timeout_s: float = 30.0
    max_requests: int = 200_000
    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    per_route: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []

    def _run(self, offset: int) -> None:
        import requests

        session = requests.Session()
        k = offset
        while not self._stop.is_set() and self.ok + self.failed < self.max_requests:
            route = self.routes[k % len(self.routes)]
            k += 1
            try:
                r = session.get(f"http://127.0.0.1:{self.port}{route}", timeout=self.timeout_s)
                good = r.status_code == 200
                detail = f"{route}: HTTP {r.status_code} {r.text[:120]}"
            except Exception as e:  # every failure is counted and reported
                good, detail = False, f"{route}: {type(e).__name__}: {e}"
            with self._lock:
                if good:
                    self.ok += 1
                    self.per_route[route] = self.per_route.get(route, 0) + 1
                else:
                    self.failed += 1
                    self.errors.append(detail)
            time.sleep(self.pause_s)

    def start(self) -> LoadLoop:
        for i in range(self.threads):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def stop(self) -> LoadLoop:
        self._stop.set()
        for t in self._workers:
            t.join(timeout=self.timeout_s + 5)
        return self


class IdleReaper:
    """The autoscaler's idle termination, for a cluster_utils cluster: a worker node with no Serve replica
    for `idle_s` is drained with reason IDLE_TERMINATION (refused if busy) and removed."""

    def __init__(self, live: LiveCluster, idle_s: float = 2.0, protect: set[str] | None = None):
        self.live = live
        self.idle_s = idle_s
        self.protect = protect or set()
        self.removed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._since: dict[str, float] = {}

    def _run(self) -> None:
        import ray
        from ray.core.generated import autoscaler_pb2

        gcs = ray._raylet.GcsClient(address=self.live.address)
        while not self._stop.wait(0.5):
            try:
                occupied = set(self.live.placement())
            except Exception:  # Serve busy or restarting: try again next tick
                continue
            now = time.monotonic()
            for name, node in list(self.live.nodes.items()):
                if name in occupied or name in self.protect or node not in self.live.cluster.worker_nodes:
                    self._since.pop(name, None)
                    continue
                self._since.setdefault(name, now)
                if now - self._since[name] < self.idle_s:
                    continue
                accepted, _ = gcs.drain_node(
                    node.node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_IDLE_TERMINATION"), "idle", 0
                )
                if accepted:
                    self.live.cluster.remove_node(node)
                    self.removed.append(name)
                self._since.pop(name, None)

    def start(self) -> IdleReaper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
