"""The vLLM application builder (ray.serve.llm). Building the config needs Ray's LLM extra; serving needs vLLM and a GPU."""

from __future__ import annotations

import pytest

from serve_integration.replica import ReplicaOptions


def test_llm_config_streams_weights():
    pytest.importorskip("pyarrow", reason="ray.serve.llm needs ray's llm extra (pyarrow, vllm): not installed here")
    from serve_integration.llm import LiftoffCallback, llm_config

    config = llm_config(
        "s3://models/llama/",
        model_id="llama",
        engine_kwargs={"max_model_len": 4096},
        options=ReplicaOptions(graceful_shutdown_timeout_s=900),
    )
    assert config.engine_kwargs["load_format"] == "liftoff"
    assert config.engine_kwargs["model_loader_extra_config"]["url"] == "s3://models/llama/"
    assert config.deployment_config["graceful_shutdown_timeout_s"] == 900
    assert config.callback_config.callback_class is LiftoffCallback


def test_vllm_replica_streams_from_s3(s3_server, tmp_path):
    """A tiny random Llama in S3, served by vLLM on Ray Serve, its weights streamed (load format liftoff).
    Runs where vllm, ray's llm extra and a CUDA GPU are present."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("vllm", reason="needs the vllm extra")
    pytest.importorskip("pyarrow", reason="needs ray's llm extra")
    transformers = pytest.importorskip("transformers")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import json
    import os
    import urllib.request

    import ray
    from ray import serve

    from liftoff.devstack.services import free_port
    from serve_integration.llm import build_vllm_app

    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    client = s3_server.client()
    client.create_bucket(Bucket="llm")
    for path in tmp_path.iterdir():
        client.upload_file(str(path), "llm", f"tiny-llama/{path.name}")
    env = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    ray.init(runtime_env={"env_vars": env})
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_vllm_app(
            f"s3://llm/tiny-llama/?endpoint_url={s3_server.endpoint}&path_style=true",
            model_id="tiny-llama",
            engine_kwargs={
                "skip_tokenizer_init": True,
                "max_model_len": 128,
                "enforce_eager": True,
                "gpu_memory_utilization": 0.3,
            },
            options=ReplicaOptions(min_replicas=1, max_replicas=1, num_gpus=1, env=env),
        )
        serve.run(app, route_prefix="/")
        body = json.dumps({"model": "tiny-llama", "prompt": [1, 2, 3, 4], "max_tokens": 4, "temperature": 0}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=600) as response:
            answer = json.loads(response.read())
        assert answer["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        serve.shutdown()
        ray.shutdown()
