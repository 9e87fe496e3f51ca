"""The import contract in pyproject.toml ([tool.importlinter]): liftoff > components > layerstore, the allowed edges
between components, and no grpc/protobuf/zstandard under weightstream. `lint-imports` must pass on the tree, and
must fail on a copy of the tree with violations added (so the check itself can fail)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"
PACKAGES = ["liftoff", "layerstore", "converter", "snapshotter", "registry_proxy", "weightstream", "serve_integration"]


def lint(cwd: Path, *contracts: str) -> subprocess.CompletedProcess:
    """Run lint-imports with cwd's pyproject.toml, cwd first on the path; --contract limits it to those ids."""
    argv = [str(LINT), "--no-cache", "--no-logo", *[f"--contract={c}" for c in contracts]]
    return subprocess.run(
        argv, cwd=cwd, env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=300
    )


def test_the_tree_keeps_every_import_contract():
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_violations_in_a_copy_of_the_tree_break_the_contracts(tmp_path):
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    assert lint(tmp_path).returncode == 0  # the copy is what the tree is
    # one violation per contract kind: the foundation imports the top; a component another it may not; weightstream
    # reaches zstandard through the foundation (an indirect import counts), and a lazy import counts too
    (tmp_path / "layerstore" / "_violation.py").write_text("import liftoff.cli\n")
    (tmp_path / "converter" / "_violation.py").write_text("def later():\n    import snapshotter.pull\n")
    (tmp_path / "layerstore" / "errors.py").write_text((ROOT / "layerstore" / "errors.py").read_text() + "\nimport zstandard\n")
    done = lint(tmp_path)
    assert done.returncode == 1, done.stdout[-4000:] + done.stderr[-2000:]
    assert "3 broken" in done.stdout, done.stdout[-4000:]
    for contract in ("layers", "converter", "weights_only"):
        assert lint(tmp_path, contract).returncode == 1, contract
    assert "layerstore._violation -> liftoff.cli" in done.stdout
    assert "converter._violation -> snapshotter.pull" in done.stdout
    assert "layerstore.errors -> zstandard" in done.stdout
