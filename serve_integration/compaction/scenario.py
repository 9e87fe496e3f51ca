"""Scenario files for `liftoff compact simulate --scenario FILE`: a user's cluster, models and traffic.

YAML (`.yaml`/`.yml`, needs pyyaml: the `compact` extra) or TOML (`.toml`, stdlib). The layout is
documented in examples/compaction/README.md; `default.yaml` there is the built-in scenario. Every
problem ends in one `LiftoffError` line naming the file, the line where the parser knows it, and the
field: `scenario.yaml:14: deployments[2].gpus: expected a whole number >= 0, got "two"`.

Traffic is per deployment either a named pattern of the simulator (diurnal, bursty, decaying, flat)
or a column of a CSV file (`traffic_file`), in tokens/s or requests/s (times `tokens_per_request`):

- long format (a Prometheus range query exported as rows): `timestamp,deployment,value`;
- wide format (a Grafana panel export): `timestamp,<deployment>,<deployment>,...`.

`timestamp` is seconds (unix epoch or from the start) or ISO 8601; times are taken relative to the
first row and interpolated linearly onto the simulation's steps.
"""

from __future__ import annotations

import csv
import itertools
import math
import re
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from layerstore.errors import LiftoffError
from serve_integration.compaction.planner import Budget, BudgetWindow, NodeType
from serve_integration.compaction.simulate import Scenario, SimDeployment

PATTERNS = ("diurnal", "bursty", "decaying", "flat")
MAX_CSV_ROWS = 2_000_000
MAX_FILE_BYTES = 64 * 2**20


class _Fields:
    """Typed reads of the parsed document, with errors that name the file, line and field."""

    def __init__(self, path: Path, lines: Mapping[str, int]):
        self.path = path
        self.lines = lines

    def fail(self, field: str, message: str) -> LiftoffError:
        # the nearest enclosing field the parser gave a line for
        key = field
        while key and key not in self.lines:
            key = key.rsplit(".", 1)[0] if "." in key else (key.rsplit("[", 1)[0] if "[" in key else "")
        where = f"{self.path.name}:{self.lines[key]}" if key in self.lines else self.path.name
        return LiftoffError(f"{where}: {field}: {message}")

    def table(self, obj: Any, field: str, allowed: tuple[str, ...]) -> dict:
        if not isinstance(obj, dict):
            raise self.fail(field, f"expected a mapping, got {_show(obj)}")
        for k in obj:
            if k not in allowed:
                raise self.fail(f"{field}.{k}" if field else str(k), f"unknown field (known: {', '.join(allowed)})")
        return obj

    def number(self, obj: dict, key: str, field: str, default: Any = None, *, low: float = 0.0, strict: bool = False) -> Any:
        if key not in obj or obj[key] is None:
            if default is ...:
                raise self.fail(f"{field}.{key}" if field else key, "missing")
            return default
        v = obj[key]
        name = f"{field}.{key}" if field else key
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise self.fail(name, f"expected a number, got {_show(v)}")
        if v < low or (strict and v <= low):
            raise self.fail(name, f"expected a number {'>' if strict else '>='} {low:g}, got {v:g}")
        return float(v)

    def integer(self, obj: dict, key: str, field: str, default: Any = None, *, low: int = 0) -> Any:
        if key not in obj or obj[key] is None:
            if default is ...:
                raise self.fail(f"{field}.{key}", "missing")
            return default
        v = obj[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise self.fail(f"{field}.{key}", f"expected a whole number >= {low}, got {_show(v)}")
        return v

    def text(self, obj: dict, key: str, field: str, default: Any = None) -> Any:
        if key not in obj or obj[key] is None:
            if default is ...:
                raise self.fail(f"{field}.{key}" if field else key, "missing")
            return default
        v = obj[key]
        if not isinstance(v, str) or not v.strip():
            raise self.fail(f"{field}.{key}" if field else key, f"expected a non-empty string, got {_show(v)}")
        return v

    def resources(self, obj: dict, key: str, field: str) -> dict[str, float]:
        raw = obj.get(key) or {}
        name = f"{field}.{key}"
        if not isinstance(raw, dict):
            raise self.fail(name, f"expected a mapping of resource -> amount, got {_show(raw)}")
        return {str(k): self.number(raw, k, name) for k in raw}

    def labels(self, obj: dict, key: str, field: str) -> dict[str, str]:
        raw = obj.get(key) or {}
        name = f"{field}.{key}"
        if not isinstance(raw, dict) or not all(isinstance(v, str | int | float) for v in raw.values()):
            raise self.fail(name, f"expected a mapping of label -> value, got {_show(raw)}")
        return {str(k): str(v) for k, v in raw.items()}


def _show(v: Any) -> str:
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    return repr(v)


def _yaml_lines(node: Any, prefix: str = "", out: dict[str, int] | None = None) -> dict[str, int]:
    """Field path -> 1-based line, from pyyaml's composed node tree."""
    import yaml

    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            path = f"{prefix}.{k.value}" if prefix else str(k.value)
            out[path] = k.start_mark.line + 1
            _yaml_lines(v, path, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            path = f"{prefix}[{i}]"
            out[path] = v.start_mark.line + 1
            _yaml_lines(v, path, out)
    return out


def _parse(path: Path) -> tuple[Any, dict[str, int]]:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise LiftoffError(f"{path}: cannot read the scenario: {e.strerror or e}") from None
    if size > MAX_FILE_BYTES:
        raise LiftoffError(f"{path}: {size} bytes is too large for a scenario file (at most {MAX_FILE_BYTES})")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise LiftoffError(f"{path}: cannot read the scenario: {e}") from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        import tomllib

        try:
            return tomllib.loads(text), {}
        except tomllib.TOMLDecodeError as e:
            raise LiftoffError(f"{path.name}: not valid TOML: {e}") from None
    if suffix not in (".yaml", ".yml"):
        raise LiftoffError(f"{path.name}: unknown scenario format {suffix or '(none)'!r}: use .yaml, .yml or .toml")
    try:
        import yaml
    except ImportError:
        raise LiftoffError(
            "YAML scenarios need pyyaml: pip install 'liftoff[compact]' (or write the scenario as .toml)"
        ) from None
    try:
        doc = yaml.safe_load(text)
        lines = _yaml_lines(yaml.compose(text)) if isinstance(doc, dict) else {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path.name}:{mark.line + 1}" if mark is not None else path.name
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise LiftoffError(f"{where}: not valid YAML: {problem}") from None
    return doc, lines


TOP = (
    "name",
    "hours",
    "step_s",
    "seeds",
    "start_time",
    "max_delay_s",
    "autoscaler",
    "serve",
    "head",
    "liftoff",
    "karpenter",
    "budget",
    "budgets",
    "node_types",
    "deployments",
    "traffic_file",
)


def load_scenario(path: str | Path) -> Scenario:
    """Read and check a scenario file; LiftoffError (one line) on any problem."""
    path = Path(path)
    doc, lines = _parse(path)
    f = _Fields(path, lines)
    if not isinstance(doc, dict):
        raise f.fail("(top)", f"expected a mapping with node_types and deployments, got {_show(doc)}")
    f.table(doc, "", TOP)
    sc = Scenario(node_types=[], deployments=[], name=f.text(doc, "name", "", path.stem))
    sc.hours = f.number(doc, "hours", "", 24.0, low=0.0, strict=True)
    sc.step_s = f.number(doc, "step_s", "", 60.0, low=0.0, strict=True)
    sc.max_delay_s = f.number(doc, "max_delay_s", "", sc.max_delay_s)
    seeds = doc.get("seeds", [1, 2])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise f.fail("seeds", f"expected a non-empty list of integers, got {_show(seeds)}")
    sc.seeds = tuple(seeds)
    start = doc.get("start_time", "00:00")
    clock = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*", str(start))
    if not clock or int(clock[1]) > 23 or int(clock[2]) > 59:
        raise f.fail("start_time", f'expected "HH:MM", got {_show(start)}')
    sc.start_s = int(clock[1]) * 3600.0 + int(clock[2]) * 60.0

    a = f.table(doc.get("autoscaler") or {}, "autoscaler", ("boot_s", "idle_timeout_s"))
    sc.boot_s = f.number(a, "boot_s", "autoscaler", sc.boot_s)
    sc.idle_timeout_s = f.number(a, "idle_timeout_s", "autoscaler", sc.idle_timeout_s)
    s = f.table(doc.get("serve") or {}, "serve", ("target_utilization", "upscale_delay_s", "downscale_delay_s"))
    sc.target_utilization = _utilization(f, s, "serve", sc.target_utilization)
    sc.upscale_delay_s = f.number(s, "upscale_delay_s", "serve", sc.upscale_delay_s)
    sc.downscale_delay_s = f.number(s, "downscale_delay_s", "serve", sc.downscale_delay_s)
    h = f.table(doc.get("head") or {}, "head", ("price_per_hour",))
    sc.head_price = f.number(h, "price_per_hour", "head", sc.head_price)
    lo = f.table(doc.get("liftoff") or {}, "liftoff", ("stability_window_s", "interval_s"))
    sc.liftoff_window_s = f.number(lo, "stability_window_s", "liftoff", sc.liftoff_window_s)
    sc.liftoff_interval_s = f.number(lo, "interval_s", "liftoff", sc.liftoff_interval_s, strict=True)
    k = f.table(doc.get("karpenter") or {}, "karpenter", ("budget_percent", "consolidate_after_s"))
    pct = f.number(k, "budget_percent", "karpenter", 100 * sc.karpenter_budget_fraction, strict=True)
    if pct > 100:
        raise f.fail("karpenter.budget_percent", f"expected a percentage up to 100, got {pct:g}")
    sc.karpenter_budget_fraction = pct / 100
    sc.karpenter_consolidate_after_s = f.number(k, "consolidate_after_s", "karpenter", sc.karpenter_consolidate_after_s)
    sc.budget = _budget(f, doc)

    types = doc.get("node_types")
    if not isinstance(types, list) or not types:
        raise f.fail("node_types", f"expected a non-empty list of node types, got {_show(types)}")
    for i, t in enumerate(types):
        name = f"node_types[{i}]"
        f.table(t, name, ("name", "resources", "labels", "price_per_hour", "boot_s"))
        nt = NodeType(
            f.text(t, "name", name, ...),
            f.resources(t, "resources", name),
            f.number(t, "price_per_hour", name, ...),
            f.labels(t, "labels", name),
        )
        if not any(v > 0 for v in nt.resources.values()):
            raise f.fail(f"{name}.resources", "expected at least one resource, e.g. {GPU: 8, CPU: 96}")
        if nt.name in {x.name for x in sc.node_types}:
            raise f.fail(f"{name}.name", f'"{nt.name}" is listed twice')
        sc.node_types.append(nt)
        boot = f.number(t, "boot_s", name)
        if boot is not None:
            sc.boot_s_by_type[nt.name] = boot

    deps = doc.get("deployments")
    if not isinstance(deps, list) or not deps:
        raise f.fail("deployments", f"expected a non-empty list of deployments, got {_show(deps)}")
    csv_deps: dict[str, tuple[str, float]] = {}  # name -> (field, tokens per unit)
    for i, d in enumerate(deps):
        dep, per_unit = _deployment(f, d, f"deployments[{i}]", sc)
        if dep.name in {x.name for x in sc.deployments}:
            raise f.fail(f"deployments[{i}].name", f'"{dep.name}" is listed twice')
        sc.deployments.append(dep)
        if dep.pattern == "csv":
            csv_deps[dep.name] = (f"deployments[{i}]", per_unit)
    tf = doc.get("traffic_file")
    if tf is not None:
        tf = f.table(tf, "traffic_file", ("path", "unit"))
        rel = f.text(tf, "path", "traffic_file", ...)
        unit = f.text(tf, "unit", "traffic_file", "tokens")
        if unit not in ("tokens", "requests"):
            raise f.fail("traffic_file.unit", f'expected "tokens" or "requests" (per second), got {_show(unit)}')
        series = read_traffic_csv((path.parent / rel) if not Path(rel).is_absolute() else Path(rel))
        for name, pts in series.items():
            if name not in csv_deps:
                raise LiftoffError(
                    f"{rel}: deployment {name!r} is not in {path.name} (deployments: {', '.join(csv_deps) or 'none'})"
                )
            field, per = csv_deps[name]
            if unit == "requests" and per <= 0:
                raise f.fail(f"{field}.tokens_per_request", "needed: traffic_file.unit is requests")
            sc.traces[name] = [(t, v * (per if unit == "requests" else 1.0)) for t, v in pts]
        if "hours" not in doc and series:
            span = max(p[-1][0] for p in series.values() if p)
            sc.hours = max(sc.step_s / 3600, span / 3600)
    for name, (field, _) in csv_deps.items():
        if name not in sc.traces:
            where = "traffic_file has no column for it" if tf is not None else "there is no traffic_file"
            raise f.fail(f"{field}.traffic", f"{name} takes its traffic from the CSV file, but {where}")
    for d in sc.deployments:
        if not any(_can_host(t, d) for t in sc.node_types):
            i = sc.deployments.index(d)
            raise f.fail(f"deployments[{i}]", f"no node type can hold one replica of {d.name} (resources and selector)")
    return sc


def _can_host(t: NodeType, d: SimDeployment) -> bool:
    from serve_integration.compaction.model import fits, selector_matches

    return fits(t.resources, d.demand) and (not d.selector or selector_matches(t.labels, d.selector))


def _utilization(f: _Fields, obj: dict, field: str, default: float | None) -> float | None:
    v = f.number(obj, "target_utilization", field, default, strict=True)
    if v is not None and v > 1.0:
        raise f.fail(f"{field}.target_utilization", f"expected a fraction in (0, 1], got {v:g}")
    return v


BUDGET_FIELDS = (
    "max_draining_nodes",
    "max_moving_per_deployment",
    "min_healthy_fraction",
    "max_price_ratio",
    "max_migrations",
    "protect_warming",
)


def _budget(f: _Fields, doc: dict) -> Budget:
    b = f.table(
        doc.get("budget") or {},
        "budget",
        (
            "max_draining_nodes",
            "max_moving_per_deployment",
            "min_healthy_fraction",
            "max_price_ratio",
            "max_migrations",
            "protect_warming",
        ),
    )
    base = Budget()
    frac = f.number(b, "min_healthy_fraction", "budget", base.min_healthy_fraction)
    if frac > 1:
        raise f.fail("budget.min_healthy_fraction", f"expected a fraction in [0, 1], got {frac:g}")
    warm = b.get("protect_warming", True)
    if not isinstance(warm, bool):
        raise f.fail("budget.protect_warming", f"expected true or false, got {_show(warm)}")
    windows = []
    raw = doc.get("budgets") or []
    if not isinstance(raw, list):
        raise f.fail("budgets", f'expected a list like [{{schedule: "09:00-18:00", max_migrations: 0}}], got {_show(raw)}')
    for i, w in enumerate(raw):
        name = f"budgets[{i}]"
        f.table(w, name, ("schedule", "max_migrations", "max_draining_nodes"))
        sched = f.text(w, "schedule", name, ...)
        try:
            windows.append(
                BudgetWindow.parse(sched, f.integer(w, "max_migrations", name), f.integer(w, "max_draining_nodes", name, low=1))
            )
        except ValueError as e:
            raise f.fail(f"{name}.schedule", str(e)) from None
    return Budget(
        max_draining_nodes=f.integer(b, "max_draining_nodes", "budget", base.max_draining_nodes, low=1),
        max_moving_per_deployment=f.integer(b, "max_moving_per_deployment", "budget", None, low=1),
        min_healthy_fraction=frac,
        max_price_ratio=f.number(b, "max_price_ratio", "budget", base.max_price_ratio),
        max_migrations=f.integer(b, "max_migrations", "budget", None),
        protect_warming=warm,
        windows=tuple(windows),
    )


DEP_FIELDS = (
    "name",
    "gpus",
    "resources",
    "selector",
    "max_replicas_per_node",
    "tokens_per_s",
    "tokens_per_request",
    "load_time_s",
    "autoscaling",
    "traffic",
)


def _deployment(f: _Fields, d: Any, name: str, sc: Scenario) -> tuple[SimDeployment, float]:
    f.table(d, name, DEP_FIELDS)
    a = f.table(
        d.get("autoscaling") or {},
        f"{name}.autoscaling",
        ("min_replicas", "max_replicas", "target_utilization", "upscale_delay_s", "downscale_delay_s"),
    )
    tr = d.get("traffic")
    if tr is None:
        raise f.fail(f"{name}.traffic", 'missing: a pattern ({pattern: diurnal, peak: ..., base: ...}) or "csv"')
    dep = SimDeployment(
        name=f.text(d, "name", name, ...),
        gpus=f.integer(d, "gpus", name, 0),
        tokens_per_s=f.number(d, "tokens_per_s", name, ..., strict=True),
        pattern="csv",
        peak_tps=0.0,
        base_tps=0.0,
        min_replicas=f.integer(a, "min_replicas", f"{name}.autoscaling", 1),
        max_replicas=f.integer(a, "max_replicas", f"{name}.autoscaling", 64, low=1),
        load_time_s=f.number(d, "load_time_s", name, 120.0),
        selector=f.labels(d, "selector", name) or None,
        resources=f.resources(d, "resources", name),
        max_replicas_per_node=f.integer(d, "max_replicas_per_node", name, None, low=1),
        target_utilization=_utilization(f, a, f"{name}.autoscaling", None),
        upscale_delay_s=f.number(a, "upscale_delay_s", f"{name}.autoscaling"),
        downscale_delay_s=f.number(a, "downscale_delay_s", f"{name}.autoscaling"),
    )
    if "GPU" in dep.resources:
        raise f.fail(f"{name}.resources.GPU", "give GPUs as gpus: N")
    if not dep.demand:
        raise f.fail(name, "a replica must ask for something: gpus or resources")
    if dep.min_replicas > dep.max_replicas:
        raise f.fail(f"{name}.autoscaling.min_replicas", f"{dep.min_replicas} is above max_replicas {dep.max_replicas}")
    per = f.number(d, "tokens_per_request", name, 0.0, strict=False)
    if tr == "csv":
        return dep, per
    tname = f"{name}.traffic"
    f.table(tr, tname, ("pattern", "peak", "base", "peak_hour", "start_hour", "half_life_hours"))
    pattern = f.text(tr, "pattern", tname, ...)
    if pattern not in PATTERNS:
        raise f.fail(f"{tname}.pattern", f"expected one of {', '.join(PATTERNS)} (or traffic: csv), got {_show(pattern)}")
    dep.pattern = pattern
    dep.base_tps = f.number(tr, "base", tname, ...)
    dep.peak_tps = f.number(tr, "peak", tname, dep.base_tps)
    if dep.peak_tps < dep.base_tps:
        raise f.fail(f"{tname}.peak", f"{dep.peak_tps:g} is below base {dep.base_tps:g}")
    dep.phase_h = f.number(tr, "peak_hour", tname, 0.0)
    dep.start_h = f.number(tr, "start_hour", tname, 0.0)
    dep.half_life_h = f.number(tr, "half_life_hours", tname, 6.0, strict=True)
    return dep, per


def _timestamp(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        pass
    return datetime.fromisoformat(raw.strip().replace("Z", "+00:00")).timestamp()


def read_traffic_csv(path: Path) -> dict[str, list[tuple[float, float]]]:
    """Deployment -> [(seconds from the first row, value)], long or wide format (see the module docstring)."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise LiftoffError(f"{path}: {size} bytes is too large for a traffic file (at most {MAX_FILE_BYTES})")
        handle = path.open(newline="")
    except OSError as e:
        raise LiftoffError(f"{path}: cannot read the traffic file: {e.strerror or e}") from None
    out: dict[str, list[tuple[float, float]]] = {}
    with handle:
        reader = csv.reader(handle)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise LiftoffError(f"{path.name}: empty traffic file (expected a header: timestamp,deployment,value)") from None
        except (csv.Error, UnicodeDecodeError) as e:
            raise LiftoffError(f"{path.name}:1: not a CSV file: {e}") from None
        if len(header) < 2 or header[0].lower() not in ("timestamp", "time"):
            raise LiftoffError(f"{path.name}:1: the first column must be timestamp, got {header[:1]}")
        long = [h.lower() for h in header] == ["timestamp", "deployment", "value"] or (
            len(header) == 3 and header[1].lower() == "deployment"
        )
        t0 = None
        try:
            for row in reader:
                line = reader.line_num
                if line > MAX_CSV_ROWS:
                    raise LiftoffError(f"{path.name}: more than {MAX_CSV_ROWS} rows: resample it coarser")
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(header):
                    raise LiftoffError(f"{path.name}:{line}: {len(row)} columns, the header has {len(header)}")
                try:
                    t = _timestamp(row[0])
                except ValueError:
                    raise LiftoffError(f"{path.name}:{line}: timestamp: expected seconds or ISO 8601, got {row[0]!r}") from None
                t0 = t if t0 is None else t0
                cells = [(row[1].strip(), row[2])] if long else list(zip(header[1:], row[1:], strict=True))
                for name, raw in cells:
                    if not raw.strip():
                        continue  # a gap in a wide export
                    try:
                        v = float(raw)
                    except ValueError:
                        raise LiftoffError(f"{path.name}:{line}: {name}: expected a number, got {raw!r}") from None
                    if not math.isfinite(v) or v < 0:
                        raise LiftoffError(f"{path.name}:{line}: {name}: expected a rate >= 0, got {raw!r}")
                    out.setdefault(name, []).append((t - t0, v))
        except csv.Error as e:
            raise LiftoffError(f"{path.name}:{reader.line_num}: not a CSV file: {e}") from None
    if not out:
        raise LiftoffError(f"{path.name}: no data rows")
    for name, pts in out.items():
        if any(b[0] < a[0] for a, b in itertools.pairwise(pts)):
            raise LiftoffError(f"{path.name}: {name}: timestamps go backwards: sort the file by time")
    return out


def dump_scenario(sc: Scenario) -> dict:
    """A scenario as the document `load_scenario` reads (patterns only; no traffic file)."""
    doc: dict = {
        "name": sc.name,
        "hours": sc.hours,
        "step_s": sc.step_s,
        "seeds": list(sc.seeds),
        "max_delay_s": sc.max_delay_s,
        "autoscaler": {"boot_s": sc.boot_s, "idle_timeout_s": sc.idle_timeout_s},
        "serve": {
            "target_utilization": sc.target_utilization,
            "upscale_delay_s": sc.upscale_delay_s,
            "downscale_delay_s": sc.downscale_delay_s,
        },
        "head": {"price_per_hour": sc.head_price},
        "liftoff": {"stability_window_s": sc.liftoff_window_s, "interval_s": sc.liftoff_interval_s},
        "node_types": [
            {"name": t.name, "resources": dict(t.resources), "labels": dict(t.labels), "price_per_hour": t.price_per_hour}
            for t in sc.node_types
        ],
        "deployments": [],
    }
    for d in sc.deployments:
        tr: dict = {"pattern": d.pattern, "peak": d.peak_tps, "base": d.base_tps}
        if d.pattern == "diurnal":
            tr["peak_hour"] = d.phase_h
        if d.pattern == "decaying":
            tr["start_hour"], tr["half_life_hours"] = d.start_h, d.half_life_h
        entry: dict = {"name": d.name, "gpus": d.gpus, "tokens_per_s": d.tokens_per_s, "load_time_s": d.load_time_s}
        if d.selector:
            entry["selector"] = dict(d.selector)
        entry["autoscaling"] = {"min_replicas": d.min_replicas, "max_replicas": d.max_replicas}
        entry["traffic"] = tr
        doc["deployments"].append(entry)
    return doc
