"""Ray Serve application builders for config files (`import_path: serve_integration.apps:vllm_app`,
e.g. a KubeRay RayService's serveConfigV2): each takes the application's `args` mapping. The CPU
twin's builder is an example: `serve_integration.examples.twin:twin_app`."""

from __future__ import annotations

from typing import Any

from serve_integration.replica import ReplicaOptions

_OPTION_KEYS = set(ReplicaOptions.__dataclass_fields__)


def _options(args: dict[str, Any], **defaults: Any) -> ReplicaOptions:
    unknown = (
        set(args)
        - _OPTION_KEYS
        - {"model_url", "model_id", "loader", "tensor_parallel_size", "engine_kwargs", "accelerator_type"}
    )
    if unknown:
        raise ValueError(f"unknown application args: {', '.join(sorted(unknown))}")
    return ReplicaOptions(**{**defaults, **{k: v for k, v in args.items() if k in _OPTION_KEYS}})


def vllm_app(args: dict[str, Any]):
    """vLLM replicas streaming weights from args["model_url"] (see serve_integration.llm)."""
    from serve_integration.llm import build_vllm_app

    engine_kwargs = dict(args.get("engine_kwargs") or {})
    if "tensor_parallel_size" in args:
        engine_kwargs["tensor_parallel_size"] = int(args["tensor_parallel_size"])
    return build_vllm_app(
        args["model_url"],
        model_id=args["model_id"],
        engine_kwargs=engine_kwargs,
        options=_options(args, num_gpus=1),
        accelerator_type=args.get("accelerator_type"),
    )
