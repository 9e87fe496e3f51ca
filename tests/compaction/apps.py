"""Tiny Serve deployments for the live tests: a "model" asking for fake GPUs, with optional load time
(standing in for weights loading) and an optional fault flag file that makes replicas created while it
exists fail their health check."""

from __future__ import annotations

import os
import time

from ray import serve


@serve.deployment(
    ray_actor_options={"num_cpus": 0},
    graceful_shutdown_timeout_s=3.0,
    graceful_shutdown_wait_loop_s=0.5,
    health_check_period_s=1.0,
    health_check_timeout_s=10.0,
    max_ongoing_requests=8,
)
class Model:
    def __init__(self, name: str, load_s: float = 0.0, fault_flag: str = ""):
        self.name = name
        time.sleep(load_s)
        self.broken = bool(fault_flag) and os.path.exists(fault_flag)

    def check_health(self) -> None:
        if self.broken:
            raise RuntimeError(f"{self.name}: fault injected: this replica fails its health check")

    def __call__(self, request) -> str:
        return f"{self.name} ok"


def model(
    name: str,
    gpus: float,
    replicas: int,
    *,
    max_per_node: int | None = None,
    selector: dict | None = None,
    load_s: float = 0.0,
    fault_flag: str = "",
):
    """A bound application of one Model deployment named `name`."""
    opts: dict = {"num_cpus": 0, "num_gpus": gpus}
    if selector:
        opts["label_selector"] = selector
    kwargs: dict = {"name": name, "num_replicas": replicas, "ray_actor_options": opts}
    if max_per_node:
        kwargs["max_replicas_per_node"] = max_per_node
    return Model.options(**kwargs).bind(name, load_s, fault_flag)
