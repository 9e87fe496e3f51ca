"""`liftoff compact ...`: plan, run and simulate replica compaction for Ray Serve."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from layerstore.errors import LiftoffError

log = logging.getLogger(__name__)


def _add_cluster_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="auto", help="the Ray cluster: HOST:PORT of the head's GCS, or auto (default)")
    p.add_argument(
        "--prices", metavar="FILE", help='JSON price table: {"prices": {"<node group|instance type|accelerator>": $/h}}'
    )
    p.add_argument("--default-price", type=float, help="$/h for nodes without a price label or table entry")
    p.add_argument("--price-label", default="liftoff.io/price-per-hour", help="node label holding the $/h price")
    p.add_argument(
        "--scheduling",
        choices=["spread", "pack"],
        default="spread",
        help="Serve's scheduler mode on the cluster (pack: RAY_SERVE_USE_PACK_SCHEDULING_STRATEGY=1)",
    )
    p.add_argument("--method", choices=["auto", "milp", "greedy"], default="auto", help="planner (default auto)")
    p.add_argument("--time-limit", type=float, default=10.0, help="seconds the integer program may take (default 10)")
    p.add_argument("--max-draining-nodes", type=int, default=4, help="nodes draining at once (default 4)")
    p.add_argument("--max-moving-per-deployment", type=int, help="replicas of one deployment migrating at once")
    p.add_argument(
        "--max-migrations",
        type=parse_max_migrations,
        metavar="N",
        help="replicas one plan may migrate in all (0: only empty nodes go)",
    )
    p.add_argument(
        "--budget",
        action="append",
        type=parse_budget_window,
        default=[],
        metavar="HH:MM-HH:MM=N",
        help="at most N migrations per plan in this daily window, local time (repeatable; the first match wins), "
        "e.g. 09:00-18:00=0 for none during the day",
    )
    p.add_argument(
        "--warmup-seconds",
        action="append",
        type=parse_warmup,
        default=[],
        metavar="[APP/DEPLOYMENT=]SECONDS",
        help=f"never move a replica started less than this long ago (default {DEFAULT_WARMUP_S:g}; 0: off); "
        "APP/DEPLOYMENT=SECONDS sets one deployment's (repeatable)",
    )
    p.add_argument(
        "--min-healthy-fraction",
        type=float,
        default=0.5,
        help="fraction of each deployment's replicas that must stay out of migration (default 0.5)",
    )
    p.add_argument("--min-savings", type=float, default=0.0, help="skip plans saving less than this many $/h")
    p.add_argument("--migration-penalty", type=float, default=0.0, help="$/h one migration must earn back (default 0)")
    p.add_argument(
        "--node-types",
        metavar="FILE",
        help='JSON list of launchable node types for swap advice: [{"name", "resources", "price_per_hour"}]',
    )
    p.add_argument(
        "--min-graceful-shutdown",
        type=float,
        default=60.0,
        help="advise raising graceful_shutdown_timeout_s below this many seconds (long LLM streams)",
    )


def register(subparsers) -> None:
    compact = subparsers.add_parser("compact", help="compact Ray Serve replicas onto fewer, cheaper nodes")
    sub = compact.add_subparsers(dest="compact_command", required=True, metavar="COMMAND")

    p = sub.add_parser("plan", help="print the compaction plan for a live cluster (dry run: changes nothing)")
    _add_cluster_options(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(run=run_plan)

    p = sub.add_parser("run", help="run the compaction loop: plan, drain, let Serve migrate, release nodes")
    _add_cluster_options(p)
    p.add_argument("--once", action="store_true", help="stop after the first plan is executed (or found empty)")
    p.add_argument("--dry-run", action="store_true", help="plan in the loop but never drain")
    p.add_argument("--interval", type=float, default=30.0, help="seconds between steps (default 30)")
    p.add_argument(
        "--stability-window", type=float, default=120.0, help="calm seconds after a scaling event before planning (default 120)"
    )
    p.add_argument("--backoff", type=float, default=60.0, help="first backoff after a failure, doubled each time (default 60)")
    p.add_argument("--provider", default="ray", help="who releases emptied nodes: ray (autoscaler), kuberay, command")
    p.add_argument("--release-command", help="for --provider command: e.g. 'my-cloud delete {node_id} {address}'")
    p.add_argument("--kuberay-cluster", help="for --provider kuberay: the RayCluster name")
    p.add_argument("--kuberay-namespace", help="for --provider kuberay: its namespace (default: the pod's)")
    p.add_argument("--kuberay-api", help="for --provider kuberay: API server URL (default: in-cluster)")
    p.add_argument(
        "--state", default="kv", help="where the in-flight plan is kept: kv (the cluster's GCS, default) or a file path"
    )
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    p.add_argument(
        "--replica-start-timeout", type=float, default=600.0, help="seconds replacements may take to load (default 600)"
    )
    p.add_argument(
        "--unhealthy-grace", type=float, default=60.0, help="abort a wave once a migrating deployment is UNHEALTHY this long"
    )
    p.add_argument("--release-timeout", type=float, default=300.0, help="seconds an emptied node may take to leave")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between checks while a wave migrates")
    p.add_argument(
        "--act-on-advice",
        action="store_true",
        help="pass node-swap advice (needs --node-types) to the autoscaler with request_resources, then drain onto the new nodes",
    )
    p.add_argument("--json", action="store_true", help="print each step as one JSON line")
    p.set_defaults(run=run_loop)

    p = sub.add_parser(
        "simulate",
        help="replay traffic against policies: none, Ray's rule, ray-active, Karpenter, liftoff, the optimum",
        description="Replay a scenario's traffic against compaction policies (the built-in scenario unless --scenario). "
        "With --load-times, find instead the steady headroom each replica load time needs to meet --slo.",
    )
    p.add_argument("--scenario", metavar="FILE", help="a scenario file (.yaml or .toml; see examples/compaction/)")
    p.add_argument("--hours", type=float, help="trace length (default: the scenario's; built-in 48)")
    p.add_argument("--step", type=float, help="seconds per simulated step (default: the scenario's; built-in 60)")
    p.add_argument("--seeds", help="comma-separated trace seeds (default: the scenario's; built-in 1,2,3)")
    p.add_argument("--policies", help=f"comma-separated, from {','.join(POLICY_NAMES)} (default: all)")
    p.add_argument("--no-advice", action="store_true", help="skip the run where the autoscaler follows node-swap advice")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="plot $/h and nodes over time per policy (first seed)")
    p.add_argument(
        "--load-times",
        metavar="SPEC",
        help="headroom comparison: NAME=SECONDS,... (e.g. baseline=600,liftoff=107; NAME=1.5x scales each deployment's "
        "own load time) or the scale-up benchmark's results file (scaleup.json[#shaped|#unshaped])",
    )
    p.add_argument("--slo", type=float, default=0.99, help="fraction of demand to serve within --max-delay (default 0.99)")
    p.add_argument("--max-delay", type=float, help="queueing delay bound in seconds (default: the scenario's; built-in 30)")
    p.add_argument(
        "--headroom",
        choices=["target", "min-replicas"],
        default="target",
        help="the knob: autoscaling target utilization (default) or extra minimum replicas per deployment",
    )
    p.set_defaults(run=run_simulate)


DEFAULT_WARMUP_S = 300.0


def parse_max_migrations(text: str) -> int:
    """`--max-migrations N`: a count >= 0."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of migrations >= 0, got {text!r}")
    return n


def parse_budget_window(text: str):
    """`--budget 09:00-18:00=0`: a daily window (local time) and the migrations one plan may make in it."""
    from serve_integration.compaction.planner import BudgetWindow

    window, eq, raw = text.partition("=")
    if not eq:
        raise argparse.ArgumentTypeError(f"expected HH:MM-HH:MM=MAX_MIGRATIONS (e.g. 09:00-18:00=0), got {text!r}")
    try:
        return BudgetWindow.parse(window, max_migrations=parse_max_migrations(raw.strip()))
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}; the form is HH:MM-HH:MM=MAX_MIGRATIONS (e.g. 09:00-18:00=0)") from None


def parse_warmup(text: str) -> tuple[str, float]:
    """`--warmup-seconds 300` (key "") or `--warmup-seconds app/deployment=900`."""
    key, eq, raw = text.rpartition("=")
    key = key.strip()
    app, slash, name = key.partition("/")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0.0 <= seconds < float("inf") or (eq and not (app and slash and name)):
        raise argparse.ArgumentTypeError(
            f"expected SECONDS >= 0 or APP/DEPLOYMENT=SECONDS (e.g. 300, chat/Model=900), got {text!r}"
        )
    return key, seconds


def _warmup(args: argparse.Namespace) -> tuple[float, dict[str, float]]:
    """The default load time (the last bare --warmup-seconds) and the per-deployment ones."""
    default, per = DEFAULT_WARMUP_S, {}
    for key, seconds in getattr(args, "warmup_seconds", None) or []:
        if key:
            per[key] = seconds
        else:
            default = seconds
    return default, per


POLICY_NAMES = ("none", "ray", "ray-active", "karpenter", "liftoff", "liftoff+advice", "optimum")


def _budget(args: argparse.Namespace):
    from serve_integration.compaction.planner import Budget

    if not 0.0 <= args.min_healthy_fraction <= 1.0:
        raise LiftoffError(f"--min-healthy-fraction must be within 0..1, got {args.min_healthy_fraction}")
    return Budget(
        max_draining_nodes=args.max_draining_nodes,
        max_moving_per_deployment=args.max_moving_per_deployment,
        min_healthy_fraction=args.min_healthy_fraction,
        min_savings_per_hour=args.min_savings,
        migration_penalty_per_hour=args.migration_penalty,
        max_migrations=getattr(args, "max_migrations", None),
        windows=tuple(getattr(args, "budget", None) or ()),
    )


def _node_types(path: str | None):
    from serve_integration.compaction.planner import NodeType

    if not path:
        return ()
    try:
        raw = json.loads(Path(path).read_text())
        return tuple(
            NodeType(
                str(t["name"]),
                {k: float(v) for k, v in t["resources"].items()},
                float(t["price_per_hour"]),
                dict(t.get("labels") or {}),
            )
            for t in raw
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise LiftoffError(
            f"cannot read node types from {path}: {e!r} (expected a JSON list of {{name, resources, price_per_hour}})"
        ) from None


def _connect(args: argparse.Namespace):
    from serve_integration.compaction.cluster import Pricing, RayCluster

    pricing = Pricing.load(args.prices, default=args.default_price, label=args.price_label)
    load_time_s, load_times = _warmup(args)
    return RayCluster(args.address, pricing, scheduling=args.scheduling, load_time_s=load_time_s, load_times=load_times)


def _config(args: argparse.Namespace):
    from serve_integration.compaction.controller import ControllerConfig
    from serve_integration.compaction.executor import ExecutorConfig

    return ControllerConfig(
        interval_s=getattr(args, "interval", 30.0),
        stability_window_s=getattr(args, "stability_window", 0.0),
        backoff_initial_s=getattr(args, "backoff", 60.0),
        dry_run=getattr(args, "dry_run", True),
        budget=_budget(args),
        method=args.method,
        time_limit_s=args.time_limit,
        node_types=_node_types(args.node_types),
        min_graceful_shutdown_s=args.min_graceful_shutdown,
        act_on_advice=getattr(args, "act_on_advice", False),
        executor=ExecutorConfig(
            replica_start_timeout_s=getattr(args, "replica_start_timeout", 600.0),
            unhealthy_grace_s=getattr(args, "unhealthy_grace", 60.0),
            release_timeout_s=getattr(args, "release_timeout", 300.0),
            poll_s=getattr(args, "poll", 1.0),
        ),
    )


def render_plan(state, plan) -> str:
    """The plan as a human-readable table."""
    lines: list[str] = []
    deps = len(state.deployments)
    lines.append(
        f"cluster: {sum(1 for n in state.nodes.values() if n.alive)} nodes, ${state.cost_per_hour():.2f}/h; "
        f"{len(state.replicas)} replicas of {deps} deployment(s); Serve scheduling: {state.scheduling}"
    )
    pct = 100.0 * plan.savings_per_hour / plan.cost_before if plan.cost_before else 0.0
    quality = "optimal" if plan.optimal else "best found"
    lines.append(
        f"plan ({plan.solver}, {quality}, {plan.solve_time_s:.2f}s): keep {len(plan.keep)} nodes at ${plan.cost_after:.2f}/h, "
        f"release {len(plan.remove)}, save ${plan.savings_per_hour:.2f}/h ({pct:.0f}%), {plan.migrations} migration(s), "
        f"gap to LP bound {100 * plan.gap:.1f}%"
    )
    wave_of = {n: i + 1 for i, w in enumerate(plan.waves) for n in w.nodes}
    rows = [("NODE", "TYPE", "GPU", "$/H", "REPLICAS", "ACTION")]
    for n in sorted(state.nodes, key=lambda n: (-state.nodes[n].price_per_hour, n)):
        node = state.nodes[n]
        reps = sorted(r.deployment for r in state.replicas_on(n))
        what = ", ".join(reps) or "-"
        if node.is_head:
            action = "keep (head)"
        elif n in wave_of:
            action = f"drain in wave {wave_of[n]}"
        elif node.draining:
            action = "draining"
        elif n in plan.blocked:
            action = "keep (blocked)"
        else:
            action = "keep"
        gpus = node.total.get("GPU", 0.0)
        rows.append(
            (
                n[:12],
                node.node_type or node.labels.get("ray.io/accelerator-type", "-"),
                f"{gpus:g}",
                f"{node.price_per_hour:.2f}",
                what,
                action,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines.append("")
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    for i, w in enumerate(plan.waves):
        moves = ", ".join(f"{m.deployment} {m.replica_id} -> {m.target[:12]}" for m in w.moves) or "no replicas"
        lines.append(f"wave {i + 1}: drain {', '.join(n[:12] for n in w.nodes)}: {moves}")
    for n, why in sorted(plan.blocked.items()):
        lines.append(f"blocked: {n[:12]}: {why}")
    for note in plan.notes:
        lines.append(f"note: {note}")
    for a in plan.advice:
        lines.append(f"advice: {a.text}")
    return "\n".join(lines)


def run_plan(args: argparse.Namespace) -> int:
    from serve_integration.compaction.controller import Controller

    cluster = _connect(args)
    state = cluster.snapshot()
    p = Controller(cluster, config=_config(args)).plan_now(state)  # plans only: nothing is journaled or drained
    if args.json:
        print(json.dumps({"state": state.to_dict(), "plan": p.to_dict()}, indent=1))
    else:
        print(render_plan(state, p))
    return 0


def _store(args: argparse.Namespace, cluster):
    from serve_integration.compaction.state import FileStore, KVStore

    return KVStore(cluster) if args.state == "kv" else FileStore(args.state)


def run_loop(args: argparse.Namespace) -> int:
    from serve_integration.compaction.controller import Controller
    from serve_integration.compaction.metrics import Metrics
    from serve_integration.compaction.providers import make_provider

    if args.act_on_advice and not args.node_types:
        raise LiftoffError("--act-on-advice needs --node-types FILE: the node types the autoscaler can launch, with prices")
    provider = make_provider(args.provider, args)  # a bad provider is an error before we touch the cluster
    cluster = _connect(args)
    metrics = Metrics()
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    controller = Controller(cluster, provider, _store(args, cluster), _config(args), metrics)

    def report(step) -> None:
        if args.json:
            print(json.dumps(step.to_dict()), flush=True)
            return
        if step.action == "waiting":
            log.info("waiting: %s", step.reason)
            return
        if step.plan is not None and step.state is not None:
            print(render_plan(step.state, step.plan), flush=True)
        if step.outcome is not None:
            o = step.outcome
            print(
                f"{step.action}: {o.status}; released {len(o.released)} node(s), {o.migrations} migration(s), "
                f"saves ${o.savings_per_hour:.2f}/h. {o.reason}".rstrip(),
                flush=True,
            )
        elif step.action in ("error", "planned", "advised"):
            print(f"{step.action}: {step.reason}", flush=True)

    result = controller.run(once=args.once, on_step=report)
    if result.action == "error" or (result.outcome is not None and result.outcome.status == "aborted"):
        return 1
    return 0


def parse_load_times(spec: str):
    """`baseline=600,liftoff=107`, `NAME=1.5x`, or the scale-up benchmark's results file (medians of end-to-end)."""
    from serve_integration.compaction.simulate import LoadTime

    path, _, setting = spec.partition("#")
    if path.endswith(".json") or Path(path).is_file():
        try:
            report = json.loads(Path(path).read_text())
            results = report["results"]
            setting = setting or ("shaped" if "shaped" in results else next(iter(results)))
            med = {}
            for loader in ("baseline", "liftoff"):
                totals = sorted(float(s["total"]) for s in results[setting][loader])
                med[loader] = totals[len(totals) // 2]
        except (OSError, ValueError, KeyError, TypeError, StopIteration, IndexError) as e:
            raise LiftoffError(
                f"{path}: not a scale-up results file ({e!r}); expected benchmarks/scaleup.py's JSON "
                '{"results": {"shaped": {"baseline": [{"total": s}], "liftoff": [...]}}}'
            ) from None
        if med["baseline"] <= 0:
            raise LiftoffError(f"{path}: baseline end-to-end time is {med['baseline']:g} s")
        # the benchmark's replica is a small test model: keep each deployment's own load time as the baseline
        # and scale it by the measured ratio for liftoff
        return [LoadTime("baseline", factor=1.0), LoadTime("liftoff", factor=med["liftoff"] / med["baseline"])]
    out = []
    for part in spec.split(","):
        name, eq, raw = part.strip().partition("=")
        try:
            if not eq or not name:
                raise ValueError
            if raw.strip().endswith("x"):
                value = float(raw.strip()[:-1])
                lt = LoadTime(name, factor=value)
            else:
                value = float(raw)
                lt = LoadTime(name, seconds=value)
            if not value >= 0 or value == float("inf"):
                raise ValueError
        except ValueError:
            raise LiftoffError(
                f"--load-times: expected NAME=SECONDS[,NAME=SECONDS] (e.g. baseline=600,liftoff=107), "
                f"NAME=FACTORx, or a scaleup.json file; got {part.strip()!r}"
            ) from None
        out.append(lt)
    return out


def run_simulate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from serve_integration.compaction.simulate import (
        default_scenario,
        format_headroom,
        format_results,
        headroom,
        plot_results,
        run_scenario,
    )

    if args.scenario:
        from serve_integration.compaction.scenario import load_scenario

        sc = load_scenario(args.scenario)
    else:
        sc = default_scenario()
    for value, flag in ((args.hours, "--hours"), (args.step, "--step"), (args.max_delay, "--max-delay")):
        if value is not None and not value > 0:
            raise LiftoffError(f"{flag} must be > 0, got {value:g}")
    sc = replace(
        sc,
        hours=args.hours or sc.hours,
        step_s=args.step or sc.step_s,
        max_delay_s=args.max_delay if args.max_delay is not None else sc.max_delay_s,
    )
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()] if args.seeds else list(sc.seeds)
    except ValueError:
        raise LiftoffError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if not seeds:
        raise LiftoffError("--seeds: give at least one seed")
    if args.load_times:
        if not 0.0 < args.slo <= 1.0:
            raise LiftoffError(f"--slo must be a fraction in (0, 1], got {args.slo:g}")
        res = headroom(sc, seeds, parse_load_times(args.load_times), slo=args.slo, knob=args.headroom)
        print(json.dumps(res, indent=1) if args.json else format_headroom(res))
        return 0
    policies = None
    if args.policies:
        policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
        unknown = [p for p in policies if p not in POLICY_NAMES]
        if unknown or not policies:
            raise LiftoffError(
                f"--policies: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(POLICY_NAMES)}"
            )
    if args.plot and not args.plot.lower().endswith(".png"):
        raise LiftoffError(f"--plot writes a PNG: give a path ending in .png, got {args.plot!r}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise LiftoffError("--plot needs matplotlib: pip install 'liftoff[compact]'") from None
    results = run_scenario(sc, seeds, advice=not args.no_advice, policies=policies, series=bool(args.plot))
    if args.plot:
        plot_results(results, args.plot)
        for r in results["per_seed"]:
            for run in r["runs"].values():
                run.pop("series", None)
    if args.json:
        print(json.dumps(results, indent=1, default=lambda o: None))
    else:
        print(format_results(results))
        if args.plot:
            print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":  # `python -m serve_integration.compaction.cli ARGS` is `liftoff compact ARGS`
    os.execv(sys.executable, [sys.executable, "-m", "liftoff", "compact", *sys.argv[1:]])
