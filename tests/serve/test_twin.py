"""The CPU twin on a real Ray Serve: replicas load TinyLM from an S3 server (moto) through
weightstream, or by downloading first; both answer exactly what the model computes locally."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from liftoff.devstack.services import free_port
from serve_integration.examples.tinylm import TinyConfig, TinyLM, save_checkpoint
from serve_integration.examples.twin import build_twin_app, empty_model, load_downloading, load_streaming
from serve_integration.replica import ReplicaOptions

CONFIG = TinyConfig(dim=64, layers=2, heads=4, context=64)


@pytest.fixture(scope="module")
def model_url(s3_server, tmp_path_factory):
    """TinyLM as a sharded safetensors checkpoint in a bucket: (url, the reference model)."""
    directory = tmp_path_factory.mktemp("tinylm")
    reference = save_checkpoint(directory, CONFIG, seed=7, shards=2)
    client = s3_server.client()
    client.create_bucket(Bucket="models")
    for path in directory.iterdir():
        client.upload_file(str(path), "models", f"tiny/{path.name}")
    return f"s3://models/tiny/?endpoint_url={s3_server.endpoint}&path_style=true", reference


def test_both_loaders_give_the_reference_model(model_url):
    url, reference = model_url
    expected = reference.generate("liftoff", 12)
    assert load_streaming(url).generate("liftoff", 12) == expected
    assert load_downloading(url).generate("liftoff", 12) == expected
    assert load_downloading(url, evict=True).generate("liftoff", 12) == expected


def test_empty_model_is_allocated_and_restores_the_initializers():
    import torch

    before = torch.nn.init.normal_
    model = empty_model(CONFIG.to_json())
    assert torch.nn.init.normal_ is before
    params = dict(model.named_parameters())
    assert all(p.device.type == "cpu" for p in params.values())
    assert params["head.weight"].shape == (CONFIG.vocab, CONFIG.dim)
    reference = TinyLM(CONFIG)  # initializers work again outside
    assert reference.embed.weight.std() > 0.5


def test_empty_model_runs_no_initializer():
    """In a fresh process: no initializer ran on the meta device (which would import sympy and ~800 modules)."""
    code = (
        "import sys, torch; from serve_integration.examples.twin import empty_model; "
        f"empty_model({CONFIG.to_json()!r}); print('sympy' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_options_reach_the_deployment():
    options = ReplicaOptions(
        min_replicas=2, max_replicas=5, graceful_shutdown_timeout_s=600, num_gpus=1, env={"AWS_REGION": "us-west-2"}
    )
    deployment = options.deployment_options()
    assert deployment["autoscaling_config"]["min_replicas"] == 2
    assert deployment["graceful_shutdown_timeout_s"] == 600
    assert deployment["ray_actor_options"] == {
        "num_cpus": 1.0,
        "num_gpus": 1,
        "runtime_env": {"env_vars": {"AWS_REGION": "us-west-2"}},
    }


@pytest.fixture(scope="module")
def serve_port(s3_server):
    ray = pytest.importorskip("ray")
    from ray import serve

    env = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    for attempt in (1, 2):
        try:
            ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
            break
        except Exception as e:  # Ray's own startup checks, not ours: twice in full suites one of its head
            # processes never came up within Ray's fixed 30 s (once the raylet, once the GCS server; neither wrote
            # a log line); neither reproduced alone. Once more.
            if attempt == 2 or not any(m in str(e) for m in ("timed out during startup", "Timed out waiting for file")):
                raise
            ray.shutdown()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


@pytest.mark.parametrize("loader", ["weightstream", "download"])
def test_serve_replica_answers_with_the_model(serve_port, model_url, loader):
    from ray import serve

    url, reference = model_url
    options = ReplicaOptions(min_replicas=1, max_replicas=1, num_cpus=0.5, graceful_shutdown_timeout_s=30)
    serve.run(build_twin_app(url, options, loader=loader), name=f"tiny-{loader}", route_prefix=f"/{loader}")
    request = urllib.request.Request(
        f"http://127.0.0.1:{serve_port}/{loader}",
        method="POST",
        data=json.dumps({"prompt": "liftoff", "max_new_tokens": 12}).encode(),
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.loads(response.read())
    assert answer["text"] == reference.generate("liftoff", 12)
    assert answer["replica"]["loader"] == loader and answer["replica"]["load_seconds"] > 0
    serve.delete(f"tiny-{loader}")


def test_container_server_answers_once_loaded_and_warm(model_url):
    """The benchmark's in-container server: a ready line on stdout once the weights are in and one
    generation ran, health timings in that order, and the model's own answer."""
    url, reference = model_url
    port = free_port()
    argv = [sys.executable, "-m", "serve_integration.examples.server", "--model-url", url, "--port", str(port)]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        ready_line = server.stdout.readline()
        assert ready_line.startswith("ready: loaded with weightstream"), ready_line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            health = json.loads(response.read())
        assert health["ready"] is True
        assert health["started_at"] <= health["imported_at"] <= health["loaded_at"] <= health["warmed_at"] <= time.time()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/generate",
            method="POST",
            data=json.dumps({"prompt": "liftoff", "max_new_tokens": 12}).encode(),
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.loads(response.read())["text"] == reference.generate("liftoff", 12)
    finally:
        server.kill()
        server.wait()
