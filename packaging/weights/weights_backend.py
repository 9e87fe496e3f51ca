"""A PEP 517 backend (stdlib only) that builds the liftoff-weights wheel from the repository's sources.

setuptools ships whole packages; this wheel must ship `weightstream`, only the foundation modules it imports
(FOUNDATION) and the Serve glue without compaction or examples (SERVE_GLUE), so it writes the wheel itself: the
files, METADATA and entry points from pyproject.toml, RECORD. tests/test_packaging.py builds it with pip and
imports it in isolation.
"""

from __future__ import annotations

import base64
import hashlib
import re
import tomllib
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PACKAGES = ["weightstream"]
FOUNDATION = [f"layerstore/{name}.py" for name in ("__init__", "errors", "progress", "retry", "s3url", "units")]
# the Ray Serve glue (deploy/k8s/rayservice.yaml's import_path): ray only, the image's own; not compaction/ or examples/
SERVE_GLUE = [f"serve_integration/{name}.py" for name in ("__init__", "apps", "llm", "replica")]


def version() -> str:
    """layerstore.__version__, read without importing it."""
    found = re.search(r'^__version__ = "([^"]+)"$', (ROOT / "layerstore" / "__init__.py").read_text(), re.M)
    if not found:
        raise RuntimeError("layerstore/__init__.py has no __version__ line")
    return found.group(1)


def sources() -> list[str]:
    """Repository-relative paths of the modules the wheel ships."""
    files = [str(p.relative_to(ROOT)) for name in PACKAGES for p in sorted((ROOT / name).rglob("*.py"))]
    return [f for f in files if "__pycache__" not in f] + FOUNDATION + SERVE_GLUE


def _metadata(project: dict, dist_version: str) -> str:
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {project['name']}",
        f"Version: {dist_version}",
        f"Summary: {project['description']}",
        f"Requires-Python: {project['requires-python']}",
    ]
    lines += [f"Requires-Dist: {req}" for req in project.get("dependencies", [])]
    return "\n".join(lines) + "\n"


def _entry_points(project: dict) -> str:
    text = ""
    for group, points in project.get("entry-points", {}).items():
        text += f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in points.items()) + "\n"
    return text


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_wheel(wheel_directory: str, config_settings: dict | None = None, metadata_directory: str | None = None) -> str:
    """PEP 517: write liftoff_weights-VERSION-py3-none-any.whl into `wheel_directory`; returns its name."""
    project = tomllib.loads((HERE / "pyproject.toml").read_text())["project"]
    dist_version = version()
    stem = f"{project['name'].replace('-', '_')}-{dist_version}"
    info = f"{stem}.dist-info"
    members = [(path, (ROOT / path).read_bytes()) for path in sources()]
    members += [
        (f"{info}/METADATA", _metadata(project, dist_version).encode()),
        (f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: liftoff weights_backend\nRoot-Is-Purelib: true\nTag: py3-none-any\n"),
        (f"{info}/entry_points.txt", _entry_points(project).encode()),
        (f"{info}/top_level.txt", b"layerstore\nserve_integration\nweightstream\n"),
    ]
    record = "\n".join(_record_line(name, data) for name, data in members) + f"\n{info}/RECORD,,\n"
    name = f"{stem}-py3-none-any.whl"
    temp = Path(wheel_directory) / f".{name}.partial"
    with zipfile.ZipFile(temp, "w", zipfile.ZIP_DEFLATED) as wheel:
        for member, data in [*members, (f"{info}/RECORD", record.encode())]:
            entry = zipfile.ZipInfo(member, date_time=(2020, 1, 1, 0, 0, 0))
            entry.external_attr = 0o644 << 16
            wheel.writestr(entry, data, zipfile.ZIP_DEFLATED)
    temp.replace(Path(wheel_directory) / name)  # nothing half-written under the wheel's name
    return name


def get_requires_for_build_wheel(config_settings: dict | None = None) -> list[str]:
    """PEP 517: nothing beyond the standard library."""
    return []
