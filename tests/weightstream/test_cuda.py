"""The CUDA path: pinned ring -> side-stream copies -> device tensors. Runs where CUDA is available."""

from __future__ import annotations

import hashlib

import pytest
import torch

import weightstream
from tests.weightstream.conftest import assert_same, every_dtype_tensors, random_tensor, write_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

RING = {"range_size": 64 * 1024, "pool_bytes": 3 * 64 * 1024, "concurrency": 4}  # 3 slots: the ring wraps many times


def test_load_to_cuda_equals_safetensors(tmp_path, s3_prefix):
    tensors = every_dtype_tensors(seed=50)
    generator = torch.Generator().manual_seed(50)
    tensors["big"] = random_tensor((700, 1000), torch.float32, generator)
    write_checkpoint(tmp_path, tensors, shards=3)
    s3_prefix.upload(tmp_path)
    state = weightstream.load(s3_prefix.url(), device="cuda:0", **RING)
    assert all(t.device == torch.device("cuda", 0) for t in state.values())
    assert_same({k: v.cpu() for k, v in state.items()}, tensors)


def test_pinned_ring_is_exactly_the_pool_size_and_page_locked():
    from weightstream.cuda import PinnedRing

    ring = PinnedRing(3, 5 * 1024 * 1024 + 4096)  # not a power of two: pin_memory() would round this up
    try:
        assert ring.tensor.numel() == ring.nbytes == 3 * (5 * 1024 * 1024 + 4096)
        assert ring.tensor.is_pinned()
    finally:
        ring.close()


def test_streaming_to_cuda_keeps_tensors_valid_and_memory_bounded(tmp_path, s3_prefix):
    generator = torch.Generator().manual_seed(51)
    tensors = {f"w{i}": random_tensor((300, 311), torch.bfloat16, generator) for i in range(10)}
    write_checkpoint(tmp_path, tensors)
    s3_prefix.upload(tmp_path)
    kept = {}
    with weightstream.open(s3_prefix.url(), **RING) as checkpoint:
        stream = checkpoint.stream(device="cuda")
        for name, tensor in stream:
            assert tensor.is_cuda
            kept[name] = tensor
    torch.cuda.synchronize()
    assert_same({k: v.cpu() for k, v in kept.items()}, tensors)


def test_load_into_a_cuda_module_writes_parameters_in_place(tmp_path, s3_prefix):
    model = torch.nn.Sequential(torch.nn.Linear(257, 300), torch.nn.ReLU(), torch.nn.Linear(300, 7))
    from safetensors.torch import save_model

    save_model(model, str(tmp_path / "model.safetensors"))
    s3_prefix.upload(tmp_path)
    target = torch.nn.Sequential(torch.nn.Linear(257, 300), torch.nn.ReLU(), torch.nn.Linear(300, 7)).cuda()
    pointers = [p.data_ptr() for p in target.parameters()]
    weightstream.load_into(target, s3_prefix.url(), **RING)
    assert [p.data_ptr() for p in target.parameters()] == pointers
    x = torch.randn(5, 257)
    with torch.no_grad():
        assert torch.allclose(target(x.cuda()).cpu(), model(x), atol=1e-5)


def test_cuda_path_verifies_sha256_and_survives_faults(tmp_path, s3_prefix, fault_proxy):
    tensors = every_dtype_tensors(seed=52)
    files = write_checkpoint(tmp_path, tensors, shards=2)
    digests = {n: hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in files[:-1]}
    s3_prefix.upload(tmp_path)
    url = s3_prefix.url(endpoint=fault_proxy.endpoint)
    fault_proxy.inject("reset", "stall", "503", "truncate")
    state = weightstream.load(url, device="cuda:0", sha256=digests, stall_timeout=0.5, backoff_base=0.01, **RING)
    assert_same({k: v.cpu() for k, v in state.items()}, tensors)
    with pytest.raises(weightstream.IntegrityError):
        weightstream.load(url, device="cuda:0", sha256={**digests, files[0]: "f" * 64}, **RING)
