#!/usr/bin/env python3
"""Conversion speed: liftoff convert vs Debian's ctr-remote (eStargz, zstd:chunked), side by side.

    scripts/bench convert [--runs N]      (= .venv/bin/python -m benchmarks.convert)

Image: the realistic torch image of benchmarks/build_images.py (python3 + numpy + torch 2.13 CPU,
~350 MB gzip, ~1.1 GB unpacked, ~30k files). liftoff reads it from a loopback docker-registry and
writes a file:// store; ctr-remote converts inside a containerd content store, in its fastest
modes (--zstdchunked; --estargz --estargz-compression-level 1). Reported: uncompressed MB/s, peak
RSS, ratios, and a second liftoff convert of the same image (incremental: nothing to upload).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
from datetime import date
from pathlib import Path

from benchmarks.benchlib import load_average, machine, table, timed
from benchmarks.build_images import ensure_images
from liftoff.devstack.services import push_layout, start_registry
from snapshotter.localnode import start_containerd

WORK = Path("/var/tmp/liftoff-bench/convert")
LIFTOFF = [sys.executable, "-m", "liftoff"]


def tar_bytes(layout: Path, tag: str) -> int:
    index = json.loads((layout / "index.json").read_text())
    digest = next(m["digest"] for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / digest.split(":")[1]).read_text())
    total = 0
    for layer in manifest["layers"]:
        with gzip.open(blobs / layer["digest"].split(":")[1]) as stream:
            while chunk := stream.read(1 << 22):
                total += len(chunk)
    return total


def liftoff_runs(source: str, runs: int, extra: list[str]) -> tuple[list, object]:
    results, second = [], None
    for i in range(runs):
        store = WORK / f"store-{i}"
        shutil.rmtree(store, ignore_errors=True)
        subprocess.run(["sync"], check=True)
        results.append(timed([*LIFTOFF, "convert", source, "--store", f"file://{store}", "--json", *extra]))
        if i == 0:
            second = timed([*LIFTOFF, "convert", source, "--store", f"file://{store}", "--json", *extra])
    return results, second


def ctr_remote_run(containerd, source_ref: str, mode: list[str], name: str):
    target = f"liftoff.bench/converted:{name}"
    subprocess.run(["sync"], check=True)
    result = timed(["ctr-remote", "--address", containerd.address, "image", "convert", "--oci", *mode, source_ref, target])
    containerd.ctr("image", "rm", target, check=False)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="liftoff runs (median reported)")
    parser.add_argument("--ctr-remote-runs", type=int, default=1, help="runs per ctr-remote mode")
    parser.add_argument("--out", type=Path, default=WORK / "results.json")
    args = parser.parse_args()

    layout = ensure_images()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    total = tar_bytes(layout, "torch")
    registry = start_registry(WORK / "registry")
    containerd = start_containerd(WORK / "containerd")
    rows, report = [], {"date": date.today().isoformat(), "machine": machine(), "tar_bytes": total}
    try:
        ref = push_layout(layout, "torch", registry.host, "bench/torch")
        print(f"image {ref}: {total / 1e6:.1f} MB uncompressed; load average {load_average():.1f}", file=sys.stderr)

        def add(name: str, samples: list, extra: str = "") -> float:
            seconds = statistics.median(s.seconds for s in samples)
            rss = max(s.peak_rss_mb for s in samples)
            rate = total / seconds / 1e6
            spread = f"{min(s.seconds for s in samples):.1f}-{max(s.seconds for s in samples):.1f}"
            rows.append([name, f"{seconds:.2f}", spread, f"{rate:.1f}", f"{rss:.0f}", extra])
            report[name] = {"seconds": [s.seconds for s in samples], "mb_per_s": rate, "peak_rss_mb": rss}
            return rate

        lift, second = liftoff_runs(ref, args.runs, ["--plain-http"])
        rate = add("liftoff (registry -> file://)", lift)
        first = json.loads(lift[0].stdout)
        report["liftoff_summary"] = {k: first[k] for k in ("files", "chunks_total", "bytes_uploaded")}
        rows.append(
            [
                "liftoff second convert",
                f"{second.seconds:.2f}",
                "",
                "",
                f"{second.peak_rss_mb:.0f}",
                f"{second.seconds / statistics.median(s.seconds for s in lift):.1%} of the first",
            ]
        )
        report["liftoff_second_convert_seconds"] = second.seconds
        local, _ = liftoff_runs(f"oci:{layout}:torch", args.runs, [])
        add("liftoff (oci layout -> file://)", local)

        archive = WORK / "torch.oci.tar"
        with tarfile.open(archive, "w") as tf:
            tf.add(layout, arcname=".")
        containerd.ctr("image", "import", "--no-unpack", "--base-name", "liftoff.bench/torch", str(archive))
        source_ref = "liftoff.bench/torch:torch"
        modes = {
            "ctr-remote --zstdchunked": ["--zstdchunked"],
            "ctr-remote --estargz level 1": ["--estargz", "--estargz-compression-level", "1"],
        }
        baseline = 0.0
        for name, mode in modes.items():
            samples = [ctr_remote_run(containerd, source_ref, mode, f"{i}") for i in range(args.ctr_remote_runs)]
            baseline = max(baseline, add(name, samples))
        report["ratio_vs_fastest_ctr_remote"] = rate / baseline
        print(table(["converter", "seconds (median)", "min-max", "MB/s (uncompressed)", "peak RSS MB", "note"], rows))
        print(
            f"liftoff vs fastest ctr-remote mode: {rate / baseline:.1f}x   machine: {machine()}   "
            f"load average at end: {load_average():.1f}"
        )
    finally:
        containerd.stop()
        registry.stop()
    args.out.write_text(json.dumps(report, indent=1))
    print(f"results: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
