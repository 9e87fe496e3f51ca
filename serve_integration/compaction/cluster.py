"""Reading the cluster model from a live Ray cluster (Ray Serve 2.60).

Sources, all public or the ones Serve itself uses:
- nodes, their totals, labels, head flag: the GCS (`GcsClient.get_all_node_info`, as Serve's
  `ClusterNodeInfoCache` does); free resources: `get_all_resource_usage`; draining nodes and their
  deadlines: `get_draining_nodes`;
- applications, deployments, their configs, targets and replicas with the node each runs on: Serve's
  `ServeInstanceDetails` (the schema behind `GET /api/serve/applications/`), from the controller;
- placement groups of replicas (bundles, strategy, nodes): `ray.util.placement_group_table()`;
- other actors on a node (work a drain would kill): the GCS actor table.

Ray is imported inside functions, so `liftoff convert` never pays for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from layerstore.errors import LiftoffError
from serve_integration.compaction.model import (
    IMPLICIT_RESOURCE_PREFIX,
    ClusterState,
    Deployment,
    Node,
    Replica,
    add,
    capacity_resources,
    demand_resources,
)

log = logging.getLogger(__name__)

PRICE_LABEL = "liftoff.io/price-per-hour"
NODE_TYPE_LABELS = ("ray.io/node-group", "ray.io/group", "ray.io/node-type")
ACCELERATOR_LABEL = "ray.io/accelerator-type"
SERVE_SYSTEM_ACTORS = ("ServeController", "ProxyActor", "CompactionControllerActor")
FOREIGN_TOLERANCE = 1e-6


class ClusterError(LiftoffError):
    """The cluster could not be read or acted on."""


@dataclass
class Pricing:
    """Price per hour of a node: its label, else the first price-table entry matching it.

    Table keys are matched, in order, against the node id, its node group / type name, its
    instance type, and its accelerator type. `default` prices anything else; without it an
    unpriced node is an error that names the fix.
    """

    table: dict[str, float] = field(default_factory=dict)
    default: float | None = None
    label: str = PRICE_LABEL
    head_default: float = 0.0

    @classmethod
    def load(cls, path: str | Path | None, default: float | None = None, label: str = PRICE_LABEL) -> Pricing:
        """Read a JSON price table: {"prices": {"<name>": dollars_per_hour}, "default": x} or a flat mapping."""
        if path is None:
            return cls(default=default, label=label)
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ClusterError(
                f'cannot read price table {path}: {e} (expected JSON: {{"prices": {{"node-type": 1.23}}}})'
            ) from None
        prices = data.get("prices", data) if isinstance(data, dict) else None
        if not isinstance(prices, dict):
            raise ClusterError(f"price table {path} must be a JSON object of name -> dollars per hour")
        table = {str(k): float(v) for k, v in prices.items() if k not in ("default", "prices")}
        if default is None and isinstance(data.get("default"), int | float):
            default = float(data["default"])
        return cls(table=table, default=default, label=label)

    def price(self, node_id: str, labels: Mapping[str, str], names: list[str], is_head: bool) -> float:
        if self.label in labels:
            try:
                return float(labels[self.label])
            except ValueError:
                raise ClusterError(
                    f"node {node_id[:12]} has label {self.label}={labels[self.label]!r}, not a number of dollars per hour"
                ) from None
        for key in [node_id, *names, labels.get(ACCELERATOR_LABEL, "")]:
            if key and key in self.table:
                return self.table[key]
        if self.default is not None:
            return self.default
        if is_head:
            return self.head_default
        known = ", ".join(n for n in names if n) or "none"
        raise ClusterError(
            f"node {node_id[:12]} has no price: give it the label {self.label}=<dollars per hour> "
            f"(ray start --labels), or list one of its names ({known}) in a price table (--prices FILE), "
            "or pass --default-price"
        )


def _node_names(info: Any, labels: Mapping[str, str]) -> list[str]:
    names = [labels.get(k, "") for k in NODE_TYPE_LABELS]
    names += [getattr(info, "node_type_name", ""), getattr(info, "instance_type_name", "")]
    return [n for n in names if n]


class RayCluster:
    """A connection to a running Ray cluster with Serve: snapshots, drains, and the GCS key-value store."""

    def __init__(
        self,
        address: str | None = None,
        pricing: Pricing | None = None,
        scheduling: str = "spread",
        load_time_s: float = 0.0,
        load_times: Mapping[str, float] | None = None,
    ):
        """`load_time_s`: seconds after a replica's start during which compaction leaves it alone (0: never);
        `load_times`: the same per deployment ("app/deployment" -> seconds), overriding it."""
        import ray

        self.pricing = pricing or Pricing()
        self.scheduling = scheduling
        self.load_time_s = load_time_s
        self.load_times = dict(load_times or {})
        self._unknown_warned: set[str] = set()
        if address and address != "auto" and not ray.is_initialized():
            _check_reachable(address)
        try:
            if not ray.is_initialized():
                ray.init(
                    address=address or "auto",
                    namespace="liftoff-compaction",
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                )
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ClusterError(
                f"cannot connect to the Ray cluster at {address or 'auto'}: {e} (pass --address HOST:PORT of the head's GCS)"
            ) from None
        self.gcs_address = ray.get_runtime_context().gcs_address
        self.gcs = ray._raylet.GcsClient(address=self.gcs_address)

    # --- raw reads ----------------------------------------------------------------------------
    def cluster_id(self) -> str:
        """Identifies this cluster (a journal from another cluster must not be replayed here)."""
        cid = self.gcs.cluster_id
        return cid.hex() if hasattr(cid, "hex") else str(cid)

    def node_infos(self) -> dict[str, Any]:
        return {nid.hex(): info for nid, info in self.gcs.get_all_node_info(timeout=30).items()}

    def available(self) -> dict[str, dict[str, float]]:
        from ray._common.utils import binary_to_hex

        reply = self.gcs.get_all_resource_usage(timeout=30)
        return {binary_to_hex(d.node_id): dict(d.resources_available) for d in reply.resource_usage_data.batch}

    def draining(self) -> dict[str, int]:
        """Draining node id -> deadline in ms since the epoch (0: none)."""
        return dict(self.gcs.get_draining_nodes(timeout=30))

    def alive_nodes(self) -> set[str]:
        from ray.core.generated import gcs_pb2

        return {n for n, info in self.node_infos().items() if info.state == gcs_pb2.GcsNodeInfo.ALIVE}

    def death_reason(self, node_id: str) -> str:
        from ray.core.generated import gcs_pb2

        info = self.node_infos().get(node_id)
        if info is None:
            return "unknown node"
        if info.state == gcs_pb2.GcsNodeInfo.ALIVE:
            return "alive"
        return gcs_pb2.NodeDeathInfo.Reason.Name(info.death_info.reason)

    def actors(self) -> list[Any]:
        async def fetch() -> Any:
            return await self.gcs.async_get_all_actor_info(timeout=30)

        return [a for a in asyncio.run(fetch()).values() if a.state == 2]  # ALIVE

    def serve_details(self) -> dict:
        import ray
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        try:
            controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        except ValueError:
            raise ClusterError(
                f"Ray Serve is not running on the cluster at {self.gcs_address}: start it (serve deploy / serve.run) first"
            ) from None
        return ray.get(controller.get_serve_instance_details.remote(), timeout=60)

    def placement_groups(self) -> dict[str, dict]:
        """Placement groups by name (Serve names a replica's group after the replica actor)."""
        import ray

        return {pg["name"]: pg for pg in ray.util.placement_group_table().values() if pg.get("state") == "CREATED"}

    # --- the model ----------------------------------------------------------------------------
    def snapshot(self) -> ClusterState:
        """The cluster as the planner sees it, now."""
        from ray.core.generated import gcs_pb2

        infos = self.node_infos()
        available = self.available()
        draining = self.draining()
        details = self.serve_details()
        pgs = self.placement_groups()
        actors = self.actors()

        deployments, replicas, serve_used = serve_model(details, pgs, self.load_time_s, self.load_times)
        self._check_load_times(deployments)

        foreign_actors: dict[str, list[str]] = {}
        for a in actors:
            node = a.node_id.hex()
            cls = a.class_name or ""
            if cls.startswith("ServeReplica:") or cls in SERVE_SYSTEM_ACTORS:
                continue
            foreign_actors.setdefault(node, []).append(cls or a.name or a.actor_id.hex())

        nodes: dict[str, Node] = {}
        for nid, info in infos.items():
            if info.state != gcs_pb2.GcsNodeInfo.ALIVE:
                continue
            labels = dict(info.labels)
            total_raw = dict(info.resources_total)
            total = capacity_resources(total_raw)
            avail = capacity_resources(available.get(nid, total_raw))
            used = {k: total.get(k, 0.0) - avail.get(k, 0.0) for k in total}
            foreign = {
                k: v - serve_used.get(nid, {}).get(k, 0.0)
                for k, v in used.items()
                if v - serve_used.get(nid, {}).get(k, 0.0) > FOREIGN_TOLERANCE
            }
            removable, reason = True, ""
            if nid in foreign_actors:
                removable = False
                reason = f"runs non-Serve actors ({', '.join(sorted(set(foreign_actors[nid]))[:3])}) that a drain would kill"
            elif foreign:
                removable = False
                reason = (
                    "holds resources outside Serve replicas (" + ", ".join(f"{k}={v:g}" for k, v in sorted(foreign.items())) + ")"
                )
            names = _node_names(info, labels)
            nodes[nid] = Node(
                node_id=nid,
                price_per_hour=self.pricing.price(nid, labels, names, bool(info.is_head_node)),
                total=total,
                foreign=foreign,
                labels=labels,
                is_head=bool(info.is_head_node),
                draining=nid in draining,
                alive=True,
                removable=removable,
                reason=reason,
                node_type=names[0] if names else "",
                address=info.node_manager_address,
            )
        return ClusterState(nodes, deployments, replicas, taken_at=time.time(), scheduling=self.scheduling)

    def _check_load_times(self, deployments: Mapping[str, Deployment]) -> None:
        """Warn once per name when a per-deployment load time names no deployment (a typo protects nothing)."""
        for key in sorted(set(self.load_times) - set(deployments) - self._unknown_warned):
            self._unknown_warned.add(key)
            log.warning(
                "--warmup-seconds %s=...: no deployment %s on the cluster (deployments: %s)",
                key,
                key,
                ", ".join(sorted(deployments)) or "none",
            )

    # --- actions ------------------------------------------------------------------------------
    def drain(self, node_id: str, deadline_ms: int, message: str) -> None:
        """Drain a node with reason PREEMPTION (cannot be refused); deadline 0 means none."""
        from ray.core.generated import autoscaler_pb2

        accepted, why = self.gcs.drain_node(
            node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), message, int(deadline_ms), timeout=30
        )
        if not accepted:
            raise ClusterError(f"the GCS refused to drain node {node_id[:12]}: {why}")

    def kv_get(self, key: str, namespace: str) -> bytes | None:
        return self.gcs.internal_kv_get(key.encode(), namespace=namespace.encode(), timeout=30)

    def kv_put(self, key: str, value: bytes, namespace: str) -> None:
        self.gcs.internal_kv_put(key.encode(), value, True, namespace=namespace.encode(), timeout=30)

    def kv_del(self, key: str, namespace: str) -> None:
        self.gcs.internal_kv_del(key.encode(), False, namespace=namespace.encode(), timeout=30)


def _check_reachable(address: str) -> None:
    """Fail fast (Ray itself retries for a minute) when nothing listens at HOST:PORT."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--address {address!r} is not HOST:PORT (the head's GCS address, e.g. 10.0.0.1:6379) or auto")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ClusterError(
            f"nothing answers at {address} ({e.strerror or e}): pass the head node's GCS address (ray start --head prints it)"
        ) from None


def serve_model(
    details: Mapping,
    pgs: Mapping[str, dict],
    load_time_s: float = 0.0,
    load_times: Mapping[str, float] | None = None,
) -> tuple[dict[str, Deployment], list[Replica], dict[str, dict[str, float]]]:
    """Deployments, placed replicas and the resources they hold per node, from Serve's instance details.

    `details` is what the Serve controller's `get_serve_instance_details` returns (the JSON form of
    `ServeInstanceDetails`). A replica's `ready_at` is its `start_time_s`: Serve reports when the replica
    actor started (or when a restarted controller recovered it), not when it became RUNNING, so a load
    time here counts from the start and should include the model's loading.
    """
    load_times = load_times or {}
    deployments: dict[str, Deployment] = {}
    replicas: list[Replica] = []
    serve_used: dict[str, dict[str, float]] = {}
    for app_name, app in (details.get("applications") or {}).items():
        for dep_name, dd in (app.get("deployments") or {}).items():
            reps = dd.get("replicas") or []
            dep = _deployment(app_name, dep_name, dd, [pgs.get(r.get("actor_name") or "") for r in reps])
            dep = replace(dep, load_time_s=float(load_times.get(dep.key, load_time_s)))
            deployments[dep.key] = dep
            for r in reps:
                node = r.get("node_id")
                if not node:
                    continue  # not placed yet (PENDING_ALLOCATION): the state is not stable anyway
                pg = pgs.get(r.get("actor_name") or "")
                for n, res in _replica_usage_on_nodes(dep, pg, node).items():
                    serve_used[n] = add(serve_used.get(n, {}), res)
                started = float(r.get("start_time_s") or 0.0)  # 0: Serve has not started the actor yet
                replicas.append(Replica(str(r["replica_id"]), dep.key, node, _enum(r.get("state")), started or None))
    return deployments, replicas, serve_used


def _enum(value: Any) -> str:
    return str(getattr(value, "value", value) or "")


def _deployment(app: str, name: str, dd: Mapping, pgs: list[dict | None]) -> Deployment:
    cfg = dd.get("deployment_config") or {}
    actor_opts = cfg.get("ray_actor_options") or {}
    demand = demand_resources(dd.get("required_resources") or {})
    movable, reason = True, ""
    pg = next((p for p in pgs if p), None)
    selectors: list[dict[str, str]] = []
    if actor_opts.get("label_selector"):
        selectors.append({str(k): str(v) for k, v in actor_opts["label_selector"].items()})
    for fb in actor_opts.get("fallback_strategy") or []:
        if isinstance(fb, Mapping) and fb.get("label_selector"):
            selectors.append({str(k): str(v) for k, v in fb["label_selector"].items()})
    if pg is not None:
        bundles = list(pg.get("bundles", {}).values())
        if pg.get("strategy") == "STRICT_PACK":
            total: dict[str, float] = {}
            for b in bundles:
                total = add(total, b)
            demand = demand_resources(total)
        else:
            movable, reason = False, f"placement group strategy {pg.get('strategy')} can span nodes"
    if any(k.startswith("gang") and v for k, v in cfg.items()):
        movable, reason = False, "gang-scheduled replicas move only as a whole gang"
    autoscaling = cfg.get("autoscaling_config") or {}
    target = int(dd.get("target_num_replicas") or 0)
    min_replicas = int(autoscaling.get("min_replicas", target) if autoscaling else target)
    status = _enum(dd.get("status")) or "HEALTHY"
    mrpn = cfg.get("max_replicas_per_node")
    return Deployment(
        app=app,
        name=name,
        demand=demand,
        target_replicas=target,
        min_replicas=min_replicas,
        max_replicas_per_node=int(mrpn) if mrpn else None,
        label_selectors=tuple(selectors),
        movable=movable,
        reason=reason,
        healthy=status == "HEALTHY",
        status=status,
        message=str(dd.get("message") or ""),
        graceful_shutdown_timeout_s=float(cfg.get("graceful_shutdown_timeout_s", 20.0)),
    )


def _replica_usage_on_nodes(dep: Deployment, pg: dict | None, node: str) -> dict[str, dict[str, float]]:
    """Resources a replica holds, per node (a placement group may reserve on several nodes)."""
    if pg is None:
        return {node: {k: v for k, v in dep.demand.items() if not k.startswith(IMPLICIT_RESOURCE_PREFIX)}}
    out: dict[str, dict[str, float]] = {}
    where = pg.get("bundles_to_node_id", {})
    for idx, bundle in pg.get("bundles", {}).items():
        n = where.get(idx) or node
        out[n] = add(out.get(n, {}), bundle)
    return out
