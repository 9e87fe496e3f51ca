"""The weights-only distribution (packaging/weights, liftoff-weights): built with pip, it holds weightstream, only the
foundation modules it imports and the Ray Serve glue, declares the vLLM plugin, and works installed on its own, next to
torch and boto3 but without the repository, grpc, protobuf or zstandard."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
FOUNDATION = {f"layerstore/{name}.py" for name in ("__init__", "errors", "progress", "retry", "s3url", "units")}
SERVE_GLUE = {f"serve_integration/{name}.py" for name in ("__init__", "apps", "llm", "replica")}

# Run with -I -S: no repository, no current directory, no .pth files (so not the editable install of liftoff-serving);
# only the installed wheel and the site-packages that hold torch and boto3, with grpc/protobuf/zstandard blocked.
CHILD = """
import importlib, importlib.metadata, json, sys
target, site, model = sys.argv[1:4]
sys.path[:0] = [target]
sys.path.append(site)
for name in ("grpc", "google.protobuf", "zstandard"):
    sys.modules[name] = None
names = sys.argv[4:]
for name in names:
    importlib.import_module(name)
tops = ("weightstream", "layerstore", "liftoff", "converter", "snapshotter", "serve_integration")
ours = sorted(m for m in sys.modules if m.split(".")[0] in tops)
outside = [m for m in ours if not (getattr(sys.modules[m], "__file__", "") or "").startswith(target)]
import weightstream
state = weightstream.load("file://" + model)
plugins = [(ep.name, ep.value, ep.dist.name) for ep in importlib.metadata.entry_points(group="vllm.general_plugins")]
from weightstream import vllm_plugin
vllm_plugin.register()  # without vLLM: a no-op, not an error
print(json.dumps({"modules": ours, "outside": outside, "plugins": plugins,
                  "state": {k: v.flatten().tolist() for k, v in state.items()}}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "-w", str(out), str(ROOT / "packaging" / "weights")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (path,) = out.glob("*.whl")
    return path


def test_the_wheel_holds_weightstream_and_only_the_foundation_it_imports(wheel):
    assert wheel.name == "liftoff_weights-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = "liftoff_weights-0.1.0.dist-info"
        metadata = zf.read(f"{info}/METADATA").decode()
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    code = {n for n in names if not n.startswith(info)}
    expected = {str(p.relative_to(ROOT)) for p in (ROOT / "weightstream").rglob("*.py") if "__pycache__" not in p.parts}
    assert code == expected | FOUNDATION | SERVE_GLUE
    assert "Name: liftoff-weights\n" in metadata
    requires = sorted(line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist: "))
    assert requires == ["boto3>=1.35", "torch"]
    assert "[vllm.general_plugins]\nliftoff_weights = weightstream.vllm_plugin:register\n" in entry_points


def test_the_installed_wheel_loads_weights_alone(wheel, tmp_path):
    target = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    save_file({"w": torch.arange(4, dtype=torch.float32)}, str(tmp_path / "model.safetensors"))
    modules = sorted(
        ".".join(p.relative_to(target).with_suffix("").parts).removesuffix(".__init__")
        for p in target.rglob("*.py")
        if p.name != "vllm_loader.py"  # imports vLLM itself: loaded by register() only where vLLM is installed
    )
    site = sysconfig.get_paths()["purelib"]
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", CHILD, str(target), site, str(tmp_path / "model.safetensors"), *modules],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["outside"] == [], result["outside"]
    assert {"layerstore.s3url", "weightstream.cli", "serve_integration.apps", "serve_integration.llm"} <= set(result["modules"])
    assert ["liftoff_weights", "weightstream.vllm_plugin:register", "liftoff-weights"] in result["plugins"]
    assert result["state"] == {"w": [0.0, 1.0, 2.0, 3.0]}


def test_a_foundation_module_missing_from_the_wheel_fails_the_isolated_import(wheel, tmp_path):
    """The isolation is real: without s3url in the installed wheel, weightstream.sources cannot import it from the
    repository (or the editable install) instead."""
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    (target / "layerstore" / "s3url.py").unlink()
    site = sysconfig.get_paths()["purelib"]
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", CHILD, str(target), site, str(tmp_path / "none"), "weightstream.sources"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"cannot import name 's3url' from 'layerstore' ({target / 'layerstore' / '__init__.py'})" in done.stderr
