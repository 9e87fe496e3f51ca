"""Real vLLM on the CPU (scripts/test-vllm runs these in a virtualenv with vllm==0.33; elsewhere they skip).

The load format resolves through liftoff's `vllm.general_plugins` entry point and vLLM's own plugin loading; a
small Llama built by vLLM's own model classes (world size 1, then TP=2 in two processes, gloo) is filled by
liftoff's loader from S3 (moto), and every parameter equals what vLLM's default safetensors loader gives for
the same checkpoint; at TP=2 the ranks together fetch the checkpoint's bytes once (read-once exchange), and at
PP=2 each stage reads only its own layers. Bytes are counted by the loader and at a relay in front of the store.
The workers import weightstream from the installed liftoff-weights wheel (scripts/test-vllm reinstalls it from
this checkout on every run; a stale install fails the tests with a message saying so).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

vllm = pytest.importorskip("vllm", reason="vllm is not installed here: scripts/test-vllm runs these in its own venv")

import torch  # noqa: E402

from liftoff.devstack.services import free_port  # noqa: E402
from tests.faultproxy import FaultProxy, header  # noqa: E402
from tests.weightstream.conftest import write_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RANK_TIMEOUT = 420  # seconds: importing vLLM takes ~25 s a process on 2 busy cores; two models a rank

# A small Llama: 2 layers, fp32; embeddings and lm_head are 16 MiB each, so the read-once plan splits them by rows
# between the ranks and sends the layers' tensors whole, in runs, to the rank with the fewest bytes so far.
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "num_hidden_layers": 2,
    "vocab_size": 8192,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def llama_tensors(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face Llama checkpoint for `config`, random normal values."""
    generator = torch.Generator().manual_seed(seed)
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


class CountingProxy(FaultProxy):
    """The fault relay, relaying everything and recording every request's method, key and Range (the bytes the
    loaders asked the store for, counted outside them)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__(upstream)
        self.heads: list[bytes] = []

    def _next_fault(self, head: bytes) -> str:
        with self._lock:
            self.heads.append(head)
        return super()._next_fault(head)

    def ranged_bytes(self) -> tuple[int, int]:
        """(bytes of data ranges, bytes of header probes: ranges from byte 0) requested by GETs."""
        data = probes = 0
        for head in self.heads:
            value = header(head, "Range")
            found = re.fullmatch(r"bytes=(\d+)-(\d+)", value or "")
            if not head.startswith(b"GET ") or not found:
                continue
            start, stop = int(found.group(1)), int(found.group(2)) + 1
            if start == 0:
                probes += stop
            else:
                data += stop - start
        return data, probes

    def whole_weight_gets(self) -> int:
        """GETs of a .safetensors object without a Range (a whole-file download; config.json is fetched whole)."""
        gets = [h for h in self.heads if h.startswith(b"GET ") and header(h, "Range") is None]
        return sum(1 for h in gets if h.split()[1].endswith(b".safetensors"))


@pytest.fixture(scope="module", autouse=True)
def installed_weights_match_the_checkout():
    """The workers import weightstream from the installed liftoff-weights wheel: it must be this checkout's."""
    dist = importlib.metadata.distribution("liftoff-weights")
    stale = [
        str(f)
        for f in dist.files or []
        if str(f).startswith(("weightstream/", "layerstore/"))
        and str(f).endswith(".py")
        and f.read_text() != (ROOT / str(f)).read_text()
    ]
    assert not stale, f"the installed liftoff-weights is older than this checkout ({stale[:3]}): run scripts/test-vllm"


def check_worker(result: dict) -> None:
    """What every worker saw: the CPU, liftoff's loader registered by the installed wheel's entry point."""
    assert result["device"] == "cpu"
    ours = [point for point in result["entry_points"] if point[1] == "liftoff_weights"]  # vLLM declares its own, too
    assert ours == [["liftoff-weights", "liftoff_weights", "weightstream.vllm_plugin:register"]]
    assert "site-packages" in result["weightstream_file"]  # the installed wheel, not the checkout
    assert result["liftoff_loader"] == "weightstream.vllm_loader.LiftoffModelLoader"  # what vLLM's plugin loading did
    assert result["loader_class"] == "weightstream.vllm_loader.LiftoffModelLoader"
    assert result["model_class"] == "vllm.model_executor.models.llama.LlamaForCausalLM"
    assert result["config_files"] == ["config.json"]


# checkpoint variants: (config changes, shards)
VARIANTS = {
    "fp32": ({}, 1),
    "bf16-sharded-tied": ({"torch_dtype": "bfloat16", "tie_word_embeddings": True}, 2),  # no lm_head.weight; index.json
}


@pytest.fixture
def llama(request, tmp_path, s3_prefix):
    """The checkpoint in a local directory (vLLM's default loader) and on S3 behind a counting relay (liftoff's)."""
    changes, shards = VARIANTS[getattr(request, "param", "fp32")]
    config = CONFIG | changes
    local = tmp_path / "llama"
    local.mkdir()
    (local / "config.json").write_text(json.dumps(config))
    tensors = {k: v.to(getattr(torch, config["torch_dtype"])) for k, v in llama_tensors(config).items()}
    if config["tie_word_embeddings"]:
        del tensors["lm_head.weight"]
    write_checkpoint(local, tensors, shards=shards)
    s3_prefix.upload(local)
    upstream = urlsplit(s3_prefix.server.endpoint)
    proxy = CountingProxy((upstream.hostname, upstream.port))
    yield local, s3_prefix.url(endpoint=proxy.endpoint), tensors, proxy
    proxy.stop()


def run_ranks(workdir: Path, world: int, local: Path, url: str, extra: dict | None = None, pp: int = 1) -> list[dict]:
    """`world` vLLM worker processes (tests/vllm/ranks.py) in one gloo group; each rank's report."""
    spec = {
        "workdir": str(workdir),
        "local_dir": str(local),
        "url": url,
        "world": world,
        "pp": pp,
        # the model in fp32 whatever the checkpoint's dtype (vLLM's weight loaders convert): after loading, vLLM
        # repacks bf16 linear weights for its CPU kernels (torch.ops._C.convert_weight_packed on AMX CPUs), which
        # the CUDA wheel does not ship; fp32 layers keep torch's own linear
        "dtype": "float32",
        "init_method": f"tcp://127.0.0.1:{free_port()}",
        "extra": extra or {},
    }
    (workdir / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"VLLM_TARGET_DEVICE": "cpu"}
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(open(workdir / f"rank{r}.log", "w")) for r in range(world)]
        processes = [
            subprocess.Popen(  # a script, not the repository on sys.path: vLLM and weightstream as installed
                [sys.executable, str(Path(__file__).with_name("ranks.py")), str(workdir / "spec.json"), str(r)],
                cwd=workdir,
                env=env,
                stdout=logs[r],
                stderr=subprocess.STDOUT,
            )
            for r in range(world)
        ]
        try:
            deadline = time.monotonic() + RANK_TIMEOUT
            for p in processes:
                p.wait(max(1, deadline - time.monotonic()))
        finally:
            for p in processes:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    results = []
    for r in range(world):
        path = workdir / f"rank{r}.json"
        tail = (workdir / f"rank{r}.log").read_text()[-4000:]
        assert path.exists(), f"rank {r} exited {processes[r].returncode} without a report:\n{tail}"
        result = json.loads(path.read_text())
        assert "error" not in result, f"rank {r}: {result['traceback']}\n{tail}"
        results.append(result)
    return results


def sha(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def checkpoint_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_load_format_resolves_through_liftoffs_entry_point(monkeypatch):
    monkeypatch.setenv("VLLM_TARGET_DEVICE", "cpu")
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.plugins import load_general_plugins

    # here the repository is on sys.path too, so its liftoff_serving.egg-info (an editable install's) may be seen
    points = [e for e in importlib.metadata.entry_points(group="vllm.general_plugins") if e.name == "liftoff_weights"]
    assert {e.value for e in points} == {"weightstream.vllm_plugin:register"}
    assert "liftoff-weights" in {e.dist.name for e in points}  # the wheel from packaging/weights
    load_general_plugins()  # vLLM's own plugin loading, as in every process it starts
    load_general_plugins()  # idempotent
    loader = get_model_loader(LoadConfig(load_format="liftoff", model_loader_extra_config={"url": "s3://b/llama/"}))
    from weightstream.vllm_loader import LiftoffModelLoader

    assert isinstance(loader, LiftoffModelLoader) and isinstance(loader, BaseModelLoader)
    with pytest.raises(ValueError, match="unknown model_loader_extra_config key"):
        get_model_loader(LoadConfig(load_format="liftoff", model_loader_extra_config={"uri": "s3://b/llama/"}))


@pytest.mark.parametrize("llama", list(VARIANTS), indirect=True)
def test_vllm_llama_on_cpu_equals_the_default_loader(tmp_path, llama):
    local, url, tensors, proxy = llama
    (result,) = run_ranks(tmp_path, 1, local, url)
    check_worker(result)
    assert result["tp"] == {"rank": 0, "world": 1, "backend": "gloo"}
    default, liftoff = result["default"], result["liftoff"]
    assert "model.layers.0.self_attn.qkv_proj.weight" in default  # vLLM's own fused layout
    assert liftoff == default  # every parameter and buffer: same dtype, shape, bytes
    dtype, _, digest = default["model.embed_tokens.weight"]
    assert digest == sha(tensors["model.embed_tokens.weight"].to(getattr(torch, dtype.removeprefix("torch."))))  # loaded
    total = checkpoint_bytes(tensors)
    assert result["stats"]["bytes_fetched"] == total
    data, _ = proxy.ranged_bytes()
    assert data == total and proxy.whole_weight_gets() == 0


def test_vllm_llama_tp2_reads_the_checkpoint_once(tmp_path, llama):
    local, url, tensors, proxy = llama
    results = run_ranks(tmp_path, 2, local, url)
    total = checkpoint_bytes(tensors)
    for rank, result in enumerate(results):
        check_worker(result)
        assert result["tp"] == {"rank": rank, "world": 2, "backend": "gloo"}
        default, liftoff = result["default"], result["liftoff"]
        assert default["model.layers.0.self_attn.qkv_proj.weight"][1] == [512, 512]  # this rank's half (1024 rows)
        assert liftoff == default, f"rank {rank}: liftoff's parameters differ from vLLM's default loader's"
        stats = result["stats"]
        assert stats["bytes_fetched"] + stats["bytes_received"] == total  # its share, the rest from the other rank
    assert results[0]["default"] != results[1]["default"]  # the ranks hold different shards
    fetched = [r["stats"]["bytes_fetched"] for r in results]
    assert sum(fetched) == total, fetched  # the node read the checkpoint once: 1.0x
    assert min(fetched) > 0.3 * total, fetched  # each rank streamed a share
    data, _ = proxy.ranged_bytes()
    assert data == total and proxy.whole_weight_gets() == 0  # counted at the relay in front of the store, too


def test_vllm_llama_pipeline_stages_read_only_their_layers(tmp_path, llama):
    local, url, tensors, proxy = llama
    results = run_ranks(tmp_path, 2, local, url, pp=2)
    total = checkpoint_bytes(tensors)
    for stage, result in enumerate(results):
        check_worker(result)
        assert result["pp"] == {"rank": stage, "world": 2} and result["tp"]["world"] == 1
        assert result["liftoff"] == result["default"], f"stage {stage}: liftoff's parameters differ from vLLM's default loader's"
    assert "model.embed_tokens.weight" in results[0]["default"] and "lm_head.weight" in results[1]["default"]
    assert "model.layers.1.mlp.down_proj.weight" not in results[0]["default"]  # vLLM's placeholder for stage 1's layer
    fetched = [r["stats"]["bytes_fetched"] for r in results]
    assert sum(fetched) == total, fetched  # each stage read its own layers only
    data, _ = proxy.ranged_bytes()
    assert data == total
