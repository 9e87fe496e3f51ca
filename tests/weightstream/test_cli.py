"""`liftoff weights load|bench|config`, run as an operator would."""

from __future__ import annotations

import json

import torch

from tests.conftest import run_cli
from tests.weightstream.conftest import every_dtype_tensors, random_tensor, write_checkpoint


def test_weights_load_reports_and_validates(tmp_path, s3_prefix):
    tensors = every_dtype_tensors(seed=40)
    write_checkpoint(tmp_path, tensors, shards=2)
    s3_prefix.upload(tmp_path)
    done = run_cli("weights", "load", s3_prefix.url(), "--device", "cpu", "--range-size", "64KiB", "--concurrency", "4", "--json")
    summary = json.loads(done.stdout)
    assert summary["tensors"] == len(tensors) and summary["files"] == 2
    assert summary["bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert summary["ranges"] >= 2 and summary["retries"] == 0
    text = run_cli("weights", "load", s3_prefix.url(), "--filter", "f32.*", "--dtype", "float16").stdout
    assert "7 tensors in 2 file(s)" in text


def test_weights_load_errors_are_one_clear_line(tmp_path, s3_prefix):
    done = run_cli("weights", "load", s3_prefix.url(), check=False)
    assert done.returncode == 1
    assert done.stderr.startswith("liftoff: error: no safetensors checkpoint under s3://")
    write_checkpoint(tmp_path, {"w": torch.zeros(3)})
    done = run_cli("weights", "load", str(tmp_path), "--device", "tpu:0", check=False)
    assert done.returncode == 1 and "tpu:0" in done.stderr and "Traceback" not in done.stderr
    if not torch.cuda.is_available():
        done = run_cli("weights", "load", str(tmp_path), "--device", "cuda:0", check=False)
        assert done.returncode == 1 and "CUDA is not available" in done.stderr


def test_weights_bench_and_config(tmp_path, s3_prefix):
    generator = torch.Generator().manual_seed(41)
    write_checkpoint(tmp_path / "ckpt", {f"w{i}": random_tensor((128, 512), torch.float32, generator) for i in range(4)})
    (tmp_path / "ckpt" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")
    s3_prefix.upload(tmp_path / "ckpt")
    done = run_cli("weights", "bench", s3_prefix.url(), "--repeat", "1", "--range-size", "64KiB", "--concurrency", "2", "--json")
    result = json.loads(done.stdout)
    assert result["best"]["range_size"] == 65536 and result["best"]["gbps"] > 0
    done = run_cli("weights", "config", s3_prefix.url(), str(tmp_path / "local"))
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == ["config.json", "tokenizer.json"]
    assert "--load-format liftoff" in done.stdout


def test_weights_load_gives_up_on_a_silent_endpoint_within_its_stall_timeout():
    """`--stall-timeout` reaches every request: a server that accepts and never answers fails in ~3 stalls."""
    import time

    from tests.silent_server import SilentServer

    server = SilentServer()
    try:
        started = time.monotonic()
        url = f"s3://any-bucket/llama/?endpoint_url={server.endpoint}&path_style=true"
        done = run_cli("weights", "load", url, "--stall-timeout", "1", check=False)
        elapsed = time.monotonic() - started
    finally:
        server.stop()
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and "check the endpoint" in done.stderr
    assert elapsed < 30, elapsed
