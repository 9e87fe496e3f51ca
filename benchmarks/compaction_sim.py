"""Compaction policies on the same traffic traces: none, Ray Serve 2.60's rule, liftoff, the optimum.

One command:

    python -m benchmarks.compaction_sim                 # 5 seeds x 48 h, prints a markdown table
    python -m benchmarks.compaction_sim --json out.json # also the raw numbers
    python -m benchmarks.compaction_sim --scenario examples/compaction/small-cluster.yaml --seeds 1,2

The cluster model, the traces and the policies live in `serve_integration/compaction/simulate.py` (also behind
`liftoff compact simulate`); this script runs the standard scenario and formats the results, and draws $/h and
worker nodes over the trace per policy for the first seed (--plot PATH; benchmarks/plots.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time


@contextlib.contextmanager
def _quiet_stdout():
    """HiGHS prints a debugging line from C++ now and then; keep stdout for the results."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def markdown(res: dict, wall_s: float) -> str:
    from serve_integration.compaction.simulate import POLICIES

    s = res["summary"]
    lines = [
        f"{len(res['seeds'])} seeds ({', '.join(map(str, res['seeds']))}) x {res['hours']:g} h at {res['step_s']:g} s steps, "
        f"totals over all seeds ({wall_s:.0f} s wall):",
        "",
        "| policy | node-hours | dollars | saved vs none | vs optimum | migrations | nodes released by compaction "
        "| migrations per node released | tokens per GPU-second | demand served | served within 30 s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in POLICIES:
        r = res["totals"].get(name)
        if r is None:
            continue
        gap = s.get("dollars_over_optimum", {}).get(name)
        lines.append(
            f"| {name} | {r['node_hours']:.0f} | {r['dollars']:.0f} | {s['savings_vs_none'][name]:.0f} "
            f"| {'-' if gap is None else f'{100 * gap:+.1f}%'} | {r['migrations']} "
            f"| {r['nodes_released_by_compaction']} | {r['migrations_per_node_released']:.2f} | {r['tokens_per_gpu_second']:.0f} "
            f"| {100 * r['served_fraction']:.1f}% | {100 * r['in_time_fraction']:.1f}% |"
        )
    lines.append("")
    lines.append("| seed | " + " | ".join(n for n in POLICIES if n in res["totals"]) + " |")
    lines.append("|---|" + "---:|" * sum(1 for n in POLICIES if n in res["totals"]))
    for r in res["per_seed"]:
        cells = " | ".join(f"${r['runs'][n]['dollars']:.0f}" for n in POLICIES if n in r["runs"])
        lines.append(f"| {r['seed']} | {cells} |")
    ratio = s["liftoff_over_ray_savings"]
    lines += [
        "",
        f"- liftoff saves {'infinitely many times (Ray saves nothing)' if math.isinf(ratio) else f'{ratio:.2f}x'} "
        "the dollars Ray's rule saves (target >= 1.3x)",
        f"- liftoff's dollars vs the optimum run: {100 * s['liftoff_dollars_over_optimum']:+.1f}% (target within 2%)",
        f"- liftoff's dollars vs the per-step optimum of its own cluster: {100 * s['liftoff_dollars_over_own_bound']:+.1f}%",
    ]
    if "advice_dollars_over_optimum" in s:
        lines.append(
            f"- liftoff with the autoscaler following its node-swap advice: {100 * s['advice_dollars_over_optimum']:+.1f}% "
            "vs the optimum run"
        )
    for k, v in s["targets"].items():
        lines.append(f"- {'met' if v else 'MISSED'}: {k}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.plots import BENCH_DIR, compaction_plot
    from serve_integration.compaction.simulate import default_scenario, format_results, run_scenario

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1,2,3,4,5")
    ap.add_argument("--hours", type=float, default=48.0)
    ap.add_argument("--step", type=float, default=60.0)
    ap.add_argument("--scenario", metavar="FILE", help="a scenario file instead of the built-in one (its hours and step)")
    ap.add_argument("--no-advice", action="store_true", help="skip the run where the autoscaler follows node-swap advice")
    ap.add_argument("--json", metavar="PATH", help="write the raw results here")
    ap.add_argument("--text", action="store_true", help="plain table instead of markdown")
    ap.add_argument(
        "--plot",
        metavar="PATH",
        help="$/h and nodes over the trace per policy, first seed (PNG; default: "
        "--json with .png, else /var/tmp/liftoff-bench/compaction_sim.png)",
    )
    args = ap.parse_args(argv)
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    started = time.perf_counter()
    with _quiet_stdout():
        if args.scenario:
            from serve_integration.compaction.scenario import load_scenario

            scenario = load_scenario(args.scenario)
        else:
            scenario = default_scenario(hours=args.hours, step_s=args.step)
        res = run_scenario(scenario, seeds, advice=not args.no_advice, series=True)
    wall = time.perf_counter() - started
    plot = args.plot or (os.path.splitext(args.json)[0] + ".png" if args.json else BENCH_DIR / "compaction_sim.png")
    compaction_plot(res, plot)
    for seed in res["per_seed"]:  # the plot's time series stay out of the JSON
        for run in seed["runs"].values():
            run.pop("series", None)
    print(format_results(res) if args.text else markdown(res, wall))
    print(f"\nplot: {plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=lambda o: None if isinstance(o, float) and math.isinf(o) else str(o))
    return 0


if __name__ == "__main__":
    sys.exit(main())
