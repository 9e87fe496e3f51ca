"""What every liftoff Serve replica shares: autoscaling, graceful shutdown and health options."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ReplicaOptions:
    """Deployment options of a model-serving replica, as Ray Serve names them.

    graceful_shutdown_timeout_s is long by default: a replica drained by compaction or
    scaled down must finish streaming its responses (Serve's default of 20 s cuts long LLM
    generations off). Health checks start failing-open only once the weights are loaded:
    the replica's constructor loads them, so Serve routes nothing to it before.
    """

    min_replicas: int = 1
    max_replicas: int = 4
    initial_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 3.0
    downscale_delay_s: float = 60.0
    graceful_shutdown_timeout_s: float = 300.0
    graceful_shutdown_wait_loop_s: float = 2.0
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    max_ongoing_requests: int = 8
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def autoscaling_config(self) -> dict:
        config = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
        }
        if self.initial_replicas is not None:
            config["initial_replicas"] = self.initial_replicas
        return config

    def deployment_options(self) -> dict:
        """Keyword arguments for `serve.deployment(...)` / `Deployment.options(...)`."""
        actor = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            actor["resources"] = dict(self.resources)
        if self.env:
            actor["runtime_env"] = {"env_vars": dict(self.env)}
        return {
            "autoscaling_config": self.autoscaling_config(),
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "graceful_shutdown_wait_loop_s": self.graceful_shutdown_wait_loop_s,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": actor,
        }
