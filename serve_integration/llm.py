"""vLLM on Ray Serve with liftoff: replicas stream their weights from S3 (load format `liftoff`,
weightstream) instead of downloading them first.

    app = build_vllm_app("s3://bucket/models/llama-3-8b/", model_id="llama-3-8b",
                         engine_kwargs={"tensor_parallel_size": 1}, options=ReplicaOptions(num_gpus=1))
    serve.run(app)   # an OpenAI-compatible app (ray.serve.llm.build_openai_app)

Ray Serve's LLM API downloads a model's files to every node before the engine starts,
except for the streaming load formats it knows. `LiftoffCallback` makes that download skip
the safetensors (config, tokenizer and index only), and the engine gets
`load_format="liftoff"` with the checkpoint URL in `model_loader_extra_config`, which
weightstream's vLLM loader (registered through the `vllm.general_plugins` entry point)
reads. Needs the `vllm` extra and GPUs; the CPU twin (examples/twin.py) runs the same path here.
"""

from __future__ import annotations

from typing import Any

from serve_integration.replica import ReplicaOptions

try:  # ray[llm] is optional: importing this module must not need it
    from ray.llm._internal.common.callbacks.base import CallbackBase as _CallbackBase
except ImportError:  # pragma: no cover - exercised only without ray's llm extra
    _CallbackBase = object  # type: ignore[assignment,misc]


class LiftoffCallback(_CallbackBase):  # type: ignore[misc,valid-type]
    """Ray Serve LLM node-initialization hook: fetch everything but the weights to the node."""

    async def on_before_node_init(self) -> None:
        from ray.llm._internal.common.utils.download_utils import NodeModelDownloadable

        self.ctx.worker_node_download_model = NodeModelDownloadable.EXCLUDE_SAFETENSORS


def llm_config(
    model_url: str,
    *,
    model_id: str,
    engine_kwargs: dict[str, Any] | None = None,
    options: ReplicaOptions | None = None,
    accelerator_type: str | None = None,
    weightstream_options: dict[str, Any] | None = None,
):
    """The ray.serve.llm LLMConfig of a liftoff-streamed vLLM replica."""
    from ray.serve.llm import LLMConfig

    options = options or ReplicaOptions(num_gpus=1)
    deployment = options.deployment_options()
    deployment.pop("ray_actor_options", None)  # Ray Serve LLM sizes the replica from the engine's parallelism
    extra = {"url": model_url, **(weightstream_options or {})}
    kwargs = {**(engine_kwargs or {}), "load_format": "liftoff", "model_loader_extra_config": extra}
    config: dict[str, Any] = {
        "model_loading_config": {"model_id": model_id, "model_source": {"bucket_uri": model_url}},
        "engine_kwargs": kwargs,
        "deployment_config": deployment,
        "callback_config": {"callback_class": LiftoffCallback},
        "runtime_env": {"env_vars": dict(options.env)} if options.env else None,
    }
    if accelerator_type:
        config["accelerator_type"] = accelerator_type
    return LLMConfig(**{k: v for k, v in config.items() if v is not None})


def build_vllm_app(model_url: str, *, model_id: str, **kwargs: Any):
    """An OpenAI-compatible Ray Serve application whose vLLM replicas stream weights from `model_url`."""
    from ray.serve.llm import build_openai_app

    return build_openai_app({"llm_configs": [llm_config(model_url, model_id=model_id, **kwargs)]})
