"""serve_integration's layout: the product (the Ray Serve glue and compaction) never imports the examples
(the CPU twin, TinyLM, the benchmark server) nor torch through them."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import serve_integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = "serve_integration.examples"
# Loaded only by the examples; importing any product module must not load them.
FORBIDDEN = (EXAMPLES, "torch")


def product_modules() -> list[str]:
    """Every module of serve_integration outside serve_integration.examples, found on disk."""
    found = pkgutil.walk_packages(serve_integration.__path__, prefix="serve_integration.", onerror=lambda name: None)
    names = [info.name for info in found if info.name != EXAMPLES and not info.name.startswith(EXAMPLES + ".")]
    return sorted(["serve_integration", *names])


def loaded_after_importing(modules: list[str]) -> list[str]:
    """Which of FORBIDDEN a fresh interpreter has in sys.modules after importing `modules`."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in {FORBIDDEN!r}))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_walk_sees_every_part():
    modules = product_modules()
    for name in ("serve_integration.apps", "serve_integration.llm", "serve_integration.replica"):
        assert name in modules
    assert "serve_integration.compaction.cli" in modules and "serve_integration.compaction.planner" in modules
    assert not [m for m in modules if m.startswith(EXAMPLES)]


def test_product_modules_import_no_examples():
    assert loaded_after_importing(product_modules()) == []


def test_the_check_sees_an_example_import():
    # The guard itself can fail: importing an example module is reported.
    assert EXAMPLES + ".twin" in loaded_after_importing([EXAMPLES + ".twin"])


def imported_names(path: Path) -> set[str]:
    """Every module an `import` or `from ... import` in `path` names, function-level ones included."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_product_source_names_the_examples_even_lazily():
    package = Path(serve_integration.__file__).parent
    offenders = {
        str(path.relative_to(ROOT)): sorted(n for n in imported_names(path) if n == EXAMPLES or n.startswith(EXAMPLES + "."))
        for path in sorted(package.rglob("*.py"))
        if (package / "examples") not in path.parents
    }
    assert {path: names for path, names in offenders.items() if names} == {}
