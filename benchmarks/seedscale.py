#!/usr/bin/env python3
"""Cold start at the seeds' scale: the vLLM image on an emulated gp3 node, overlayfs against liftoff.

    scripts/bench seedscale [--runs 3] [--keys a,b,c,e] [--no-gp3] [--out JSON] [--plot PNG] [--reuse] [--sample-daemon DIR]

The image (benchmarks/build_images.py --vllm, cached under /var/tmp): Debian bookworm minbase + python3 + a
venv with vllm 0.33.0 and its CUDA wheels, ~4.6 GB gzip, ~10 GB, ~110k files, 3 layers; the command is
`python3 -c "import vllm; print(vllm.__version__)"` (no GPU needed). The node: containerd's root, liftoff's
root and its chunk cache on ext4 on a loop device throttled like a gp3 volume (benchmarks/gp3.py: 125 MB/s
and 3000 IOPS each way, buffered writes included). The registry (Debian's docker-registry) and the store
(nginx, path-style S3) are the emulated remote: their files stay in the page cache, behind the shaping proxy
at 20 ms per request, 100 MB/s per connection, 1.25 GB/s in all. Page caches dropped before every contender,
fresh containerd and liftoff state each time. Contenders:

  (a) containerd's overlayfs: ctr image pull, then ctr run
  (b) liftoff, no profile: liftoff pull, then ctr run --snapshotter liftoff
  (c) liftoff with the image's startup profile (recorded once beforehand)
  (e) (c) pulled the Kubernetes way: CRI PullImage, containerd's own unpacker, no `liftoff pull` process
  (p) (c) with `fused --passthrough` (optional key)
  (r) (c) with `fused --erofs`: each view an EROFS image over a FUSE blob (optional key)
  (s) (e) with `fused --erofs` (optional key)
  warm: the same run again right after each first run

Printed: medians (min-max) of pull, first run, pull + first run and warm run; bytes fetched; the FUSE daemon's
CPU seconds and requests by opcode over pull + first run; the profile prefetch's duration; the issue's ratios
(when (a) ran). JSON (--out) and a timeline (--plot). `--reuse` keeps the pushed and converted image of the
previous invocation (same --layout and --tag); `--sample-daemon DIR` records the daemon's Python stacks with py-spy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from datetime import date
from pathlib import Path

from benchmarks import coldstart
from benchmarks.benchlib import load_average, machine, table
from benchmarks.build_images import VLLM_DIR, ensure_vllm_image
from benchmarks.coldstart import AWS, BUCKET, Results, layer_bytes, liftoff
from benchmarks.gp3 import Gp3Disk
from benchmarks.shaping_proxy import SEED_SHAPED, UNSHAPED, ShapingProxy
from liftoff.devstack.services import push_layout, start_nginx, start_registry

WORK = Path("/var/tmp/liftoff-bench/seedscale")
IMAGE = "vllm"
COMMAND = ["python3", "-c", "import vllm; print(vllm.__version__)"]  # --tag torch/python: coldstart's commands
LABELS = {
    "a": "(a) overlayfs pull+run",
    "b": "(b) liftoff, no profile",
    "c": "(c) liftoff + profile",
    "e": "(e) (c) by CRI PullImage",
    "p": "(p) (c) + passthrough",
    "r": "(r) (c), EROFS view",
    "s": "(s) (e), EROFS view",
}
PREFIX = {"b": "plain", "c": "profiled", "e": "profiled", "p": "profiled", "r": "profiled", "s": "profiled"}
FUSED_ARGS = {"p": ["--passthrough"], "r": ["--erofs"], "s": ["--erofs"]}


def prepare(layout: Path, registry, store_root: Path) -> dict:
    """Push the image, convert it into two prefixes (without and with a profile), record the profile."""
    started = time.monotonic()
    ref = push_layout(layout, IMAGE, registry.host, f"bench/{IMAGE}")
    timings = {"push_s": time.monotonic() - started}
    for prefix in ("plain", "profiled"):
        started = time.monotonic()
        liftoff("convert", ref, "--plain-http", "--store", f"file://{store_root / BUCKET / prefix}")
        timings[f"convert_{prefix}_s"] = time.monotonic() - started
    started = time.monotonic()
    liftoff("profile", ref, "--plain-http", "--store", f"file://{store_root / BUCKET / 'profiled'}", "--", *COMMAND)
    timings["profile_s"] = time.monotonic() - started
    summary = json.loads(liftoff("inspect", ref, "--store", f"file://{store_root / BUCKET / 'plain'}", "--json"))
    image = summary["images"][0]
    return {"repository": f"bench/{IMAGE}", "stored_bytes": image["stored_bytes"], "tar_bytes": image["tar_bytes"], **timings}


def print_table(results: Results, compressed: int, info: dict, setting: str) -> list[str]:
    rows = coldstart.sample_rows(results, LABELS, compressed)
    print(
        f"\n{IMAGE} image, {setting}: {compressed / 1e9:.2f} GB compressed (registry), "
        f"{info['stored_bytes'] / 1e9:.2f} GB in the store, {info['tar_bytes'] / 1e9:.2f} GB unpacked"
    )
    headers = [
        "",
        "pull s",
        "first run: output s",
        "first run: exit s",
        "pull+first run (exit) s",
        "warm run: output s",
        "warm run: exit s",
        "fetched (of compressed)",
        "fused CPU s",
        "FUSE requests",
    ]
    print(table(headers, rows))
    a = results.samples.get("a")
    if not a:
        return []

    def median(samples: list, field: str) -> float:
        return statistics.median(getattr(s, field) for s in samples)

    lines = []
    for key in ("b", "c", "e", "p", "r", "s"):
        samples = results.samples.get(key)
        if not samples:
            continue
        total = median(a, "total") / median(samples, "total")
        to_output = (median(a, "pull") + median(a, "run_output")) / (median(samples, "pull") + median(samples, "run_output"))
        lines.append(
            f"{LABELS[key]}: pull+first run {total:.1f}x overlayfs to the container's exit, {to_output:.1f}x to its "
            f"output; first run {median(samples, 'run') / median(a, 'warm'):.2f}x the overlayfs warm run to exit, "
            f"{median(samples, 'run_output') / median(a, 'warm_output'):.2f}x to output; warm run "
            f"{median(samples, 'warm') / median(a, 'warm'):.2f}x"
        )
    print("\n".join(lines), flush=True)
    return lines


def main() -> None:
    global IMAGE, COMMAND
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keys", default="a,b,c,e", help="which of (a), (b), (c), (e), (p), (r), (s) to run (ratios need (a))")
    parser.add_argument("--unshaped", action="store_true", help="no shaping proxy delays (the remote at loopback speed)")
    parser.add_argument("--no-gp3", action="store_true", help="the node disk unthrottled (the same loop device, no blkio limits)")
    parser.add_argument("--disk-gb", type=int, default=48, help="the emulated node disk's size")
    parser.add_argument("--out", type=Path, default=WORK.parent / "seedscale.json")
    parser.add_argument("--plot", type=Path, help="the timeline picture (PNG; default: --out with .png)")
    parser.add_argument("--layout", type=Path, default=VLLM_DIR, help="the image's OCI layout (built if missing)")
    parser.add_argument("--tag", default=IMAGE, help="the image's tag in --layout (torch, python: coldstart's images)")
    parser.add_argument("--reuse", action="store_true", help="keep the previous invocation's pushed and converted image")
    parser.add_argument("--keep-logs", action="store_true", help="copy each run's logs to WORK/logs")
    parser.add_argument("--sample-daemon", type=Path, help="py-spy stacks of the FUSE daemon per run into this folder")
    args = parser.parse_args()
    coldstart.PROFILE_DIR = args.sample_daemon
    if args.tag != IMAGE:
        IMAGE, COMMAND = args.tag, coldstart.COMMANDS[args.tag]
    keys = [k for k in LABELS if k in set(args.keys.split(","))]
    layout = ensure_vllm_image(args.layout) if args.tag == "vllm" else args.layout
    prepared = WORK / "prepared.json"
    identity = {"layout": str(layout.resolve()), "tag": IMAGE}
    reuse = args.reuse and prepared.exists() and json.loads(prepared.read_text()).get("identity") == identity
    if not reuse:
        shutil.rmtree(WORK, ignore_errors=True)
        WORK.mkdir(parents=True)
    os.environ.update(AWS)
    registry = start_registry(WORK / "registry")
    store_root = WORK / "store"
    nginx = start_nginx(store_root)
    shaping = UNSHAPED if args.unshaped else SEED_SHAPED
    setting = "unshaped" if args.unshaped else "shaped 20 ms + 100 MB/s per connection + 1.25 GB/s"
    report: dict = {"date": date.today().isoformat(), "machine": machine(), "runs": args.runs, "results": {}}
    try:
        if reuse:
            info = json.loads(prepared.read_text())["info"]
        else:
            info = prepare(layout, registry, store_root)
            prepared.write_text(json.dumps({"identity": identity, "info": info}))
        print(f"prepared{' (reused)' if reuse else ''}: {json.dumps(info)}", flush=True)
        report["prepare"] = info
        disk = Gp3Disk(WORK / "gp3", size_gb=args.disk_gb, throttle=not args.no_gp3)
        with (
            disk,
            ShapingProxy(("127.0.0.1", int(registry.host.split(":")[1])), shaping) as registry_proxy,
            ShapingProxy(("127.0.0.1", nginx.port), shaping) as store_proxy,
        ):
            report["disk"] = {"describe": disk.describe(), **disk.check()}
            print(f"node disk: {report['disk']}", flush=True)
            coldstart.run_args = disk.ctr_run_args  # containers read the node disk under its limits too
            endpoint = f"http://127.0.0.1:{store_proxy.port}"
            ref = f"127.0.0.1:{registry_proxy.port}/{info['repository']}:{IMAGE}"
            results = Results()
            for run in range(args.runs):
                for key in keys:
                    base = disk.mountpoint / f"{run}-{key}"
                    # only what this contender reads stays warm on the emulated remote
                    coldstart.WARM[:] = [registry.root] + ([store_root / BUCKET / PREFIX[key]] if key != "a" else [])
                    started = time.monotonic()
                    if key == "a":
                        sample = coldstart.measure_overlayfs(ref, COMMAND, base, registry_proxy)
                    else:
                        store = f"s3://{BUCKET}/{PREFIX[key]}?endpoint_url={endpoint}&path_style=true"
                        sample = coldstart.measure_liftoff(
                            ref, COMMAND, base, store, registry_proxy, store_proxy, FUSED_ARGS.get(key, []), cri=key in "es"
                        )
                    results.add(key, sample)
                    print(
                        f"run {run} {LABELS[key]}: pull {sample.pull:.2f} s, first run {sample.run:.2f} s (output at "
                        f"{sample.run_output:.2f} s), warm "
                        f"{sample.warm:.2f} s, fetched {(sample.registry_bytes + sample.store_bytes) / 1e6:.0f} MB, "
                        f"fused CPU {sample.fused_cpu:.2f} s, prefetch {sample.prefetch_s:.1f} s, "
                        f"warm run: fused CPU {sample.warm_fused_cpu:.2f} s, FUSE requests {_brief(sample.warm_requests)} "
                        f"({time.monotonic() - started:.0f} s with set-up; load {load_average():.1f})",
                        flush=True,
                    )
                    if args.keep_logs:
                        for log in base.glob("**/*.log"):
                            target = WORK / "logs" / base.name / log.relative_to(base)
                            target.parent.mkdir(parents=True, exist_ok=True)
                            shutil.copy(log, target)
                    shutil.rmtree(base, ignore_errors=True)
            report["results"][f"{setting}/{IMAGE}"] = {k: [s.__dict__ for s in v] for k, v in results.samples.items()}
            report["ratios"] = print_table(results, layer_bytes(layout, IMAGE), info, setting)
    finally:
        nginx.stop()
        registry.stop()
    coldstart.write_report(report, args.out, args.plot)


def _brief(requests: dict[str, int]) -> str:
    """Requests by opcode, most frequent first ("none" if there were none)."""
    return " ".join(f"{n}={c}" for n, c in sorted(requests.items(), key=lambda item: -item[1])) or "none"


if __name__ == "__main__":
    main()
