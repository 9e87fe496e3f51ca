#!/usr/bin/env python3
"""Cold start: containerd's own overlayfs pull + run against liftoff's lazy pull + run, side by side.

    scripts/bench coldstart [--runs 3] [--images torch,python] [--settings unshaped,shaped] [--keys a,b,c,d] [--plot PNG]

Images (benchmarks/build_images.py): `torch` (python3 + numpy + torch 2.13 CPU, ~350 MB gzip)
running `python3 -c "import torch; print(torch.__version__)"`, and `python` (python3 only).
The registry (Debian's docker-registry) and the store (a file:// store directory served by
Debian's nginx with path-style S3 URLs; moto re-reads whole objects per range) each sit
behind the same userspace shaping proxy (benchmarks/shaping_proxy.py), unshaped or with
20 ms per request + 100 MB/s per connection + 1 GB/s total. Per run, from fresh state
(containerd's content and snapshots, liftoff's cache and views all new; page cache dropped):

  (a) overlayfs: ctr image pull, then ctr run
  (b) liftoff without a profile: liftoff pull, then ctr run --snapshotter liftoff
  (c) liftoff with the image's startup profile (recorded once beforehand); the FUSE daemon serves
      whole local files by passthrough where the kernel has it (Linux 6.9+)
  (d) the same as (c) with `fused --no-passthrough`: every read through the daemon (older kernels)
  warm: the same run again right after each

Reported: medians (min-max) of pull, run and pull+run seconds, bytes from the registry and the
store, the FUSE daemon's CPU seconds over pull + first run and its requests by opcode, and the
ratios (a)/(c); the results as JSON (--out) and as a picture of each contender's pull and first run
and the bytes it fetched (--plot, benchmarks/plots.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from benchmarks.benchlib import drop_caches, load_average, machine, table
from benchmarks.build_images import ensure_images
from benchmarks.plots import coldstart_plot
from benchmarks.shaping_proxy import SHAPED, UNSHAPED, Shaping, ShapingProxy
from liftoff.devstack.services import push_layout, start_nginx, start_registry
from snapshotter.localnode import start_containerd

WORK = Path("/var/tmp/liftoff-bench/coldstart")
LIFTOFF = [sys.executable, "-m", "liftoff"]
COMMANDS = {
    "torch": ["python3", "-c", "import torch; print(torch.__version__)"],
    "python": ["python3", "-c", "import sys, json, ssl; print(sys.version.split()[0])"],
}
BUCKET = "liftoff-bench"
PULL_TIMEOUT = 1800.0  # containerd's unpack of a 10 GB image on a throttled disk takes minutes


def no_run_args(name: str) -> list[str]:
    return []


# extra `ctr run` arguments for a container named `name` (seedscale: the gp3 disk's throttled cgroup)
run_args: Callable[[str], list[str]] = no_run_args
WARM: list[Path] = []  # the emulated remote servers' directories: kept in the page cache across runs
PROFILE_DIR: Path | None = None  # if set, py-spy samples the FUSE daemon over each pull + first run into this folder
AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def liftoff(*args: str) -> str:
    done = subprocess.run([*LIFTOFF, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"liftoff {' '.join(args[:2])} failed: {done.stderr[-2000:]}")
    return done.stdout


@dataclass
class Sample:
    pull: float
    run: float
    warm: float
    registry_bytes: int
    store_bytes: int
    fused_cpu: float = 0.0  # the FUSE daemon's CPU seconds over pull + first run
    requests: dict[str, int] = field(default_factory=dict)  # FUSE requests by opcode over pull + first run
    prefetch_s: float = 0.0  # how long the startup profile's prefetch took (0: none ran)
    run_output: float = 0.0  # first run: seconds until the container printed its line (run: until ctr returned)
    warm_output: float = 0.0
    warm_requests: dict[str, int] = field(default_factory=dict)  # FUSE requests during the warm run
    warm_fused_cpu: float = 0.0  # the FUSE daemon's CPU seconds during the warm run

    @property
    def total(self) -> float:
        return self.pull + self.run


@dataclass
class Results:
    samples: dict[str, list[Sample]] = field(default_factory=dict)

    def add(self, key: str, sample: Sample) -> None:
        self.samples.setdefault(key, []).append(sample)


def measure_overlayfs(ref: str, command: list[str], workdir: Path, registry_proxy: ShapingProxy) -> Sample:
    containerd = start_containerd(workdir / "containerd")
    try:
        drop_caches(WARM)
        before = registry_proxy.stats.bytes_down
        started = time.monotonic()
        containerd.ctr("image", "pull", "--plain-http", "--snapshotter", "overlayfs", ref, timeout=PULL_TIMEOUT)
        pull = time.monotonic() - started
        run_output, run = timed_run(containerd, "overlayfs", ref, "bench-cold", command)
        registry_bytes = registry_proxy.stats.bytes_down - before
        warm_output, warm = timed_run(containerd, "overlayfs", ref, "bench-warm", command)
        return Sample(pull, run, warm, registry_bytes, 0, run_output=run_output, warm_output=warm_output)
    finally:
        containerd.stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    return cpu_seconds_of(Path(f"/proc/{pid}/stat"))


def cpu_seconds_of(stat: Path) -> float:
    """User + system CPU seconds from a /proc stat file (a process's or a thread's)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def liftoff_node(workdir: Path, store: str, fused_args: list[str], cri: bool = False):
    """A fresh node (the FUSE daemon with `fused_args`, the snapshotter, containerd, with its CRI plugin unpacking with
    liftoff if `cri`); yields containerd and the daemon."""
    from snapshotter.localnode import start_fused, start_snapshotter

    socket = workdir / "run" / "snapshotter.sock"
    fused = start_fused(workdir / "root" / "remote", ["--store", store, *fused_args], workdir=workdir)
    snapshotter = containerd = None
    try:
        snapshotter = start_snapshotter(
            workdir / "root", socket, workdir=workdir, log_level="info", extra_args=["--store", store, "--no-start-fused"]
        )
        containerd = start_containerd(workdir / "containerd", socket, cri=cri)
        yield containerd, fused
    finally:
        if containerd:
            containerd.stop()
        if snapshotter:
            snapshotter.stop()
        fused.stop()


def measure_liftoff(
    ref: str,
    command: list[str],
    workdir: Path,
    store: str,
    registry_proxy: ShapingProxy,
    store_proxy: ShapingProxy,
    fused_args: list[str],
    cri: bool = False,
) -> Sample:
    """A liftoff node's pull and first run; with `cri`, pulled as kubelet pulls (CRI PullImage, containerd's own
    unpacker, no `liftoff pull` process) and run in CRI's namespace."""
    from snapshotter.cri import CRIImageClient
    from snapshotter.fuse_control import FusedClient

    namespace = "k8s.io" if cri else "default"
    with liftoff_node(workdir, store, fused_args, cri=cri) as (containerd, fused):
        client = CRIImageClient(containerd.address) if cri else None
        if client:
            client.wait_ready()
        drop_caches(WARM)
        registry_before, store_before = registry_proxy.stats.bytes_down, store_proxy.stats.bytes_down
        cpu_before = cpu_seconds(fused.process.pid)
        sampler = _sample_daemon(fused.process.pid, workdir.name)
        started = time.monotonic()
        if client:
            with client:
                client.pull(ref)
        else:
            liftoff("pull", ref, "--address", containerd.address, "--plain-http", "--snapshotter", "liftoff")
        pull = time.monotonic() - started

        run_output, run = timed_run(containerd, "liftoff", ref, "bench-cold", command, namespace)
        fused_cpu = cpu_seconds(fused.process.pid) - cpu_before
        if sampler:
            sampler.stop()
        registry_bytes = registry_proxy.stats.bytes_down - registry_before
        store_bytes = store_proxy.stats.bytes_down - store_before
        fused_client = FusedClient(workdir / "root" / "remote" / "fused.sock")
        status = fused_client.status()
        requests = _view_requests(status)
        cpu_before = cpu_seconds(fused.process.pid)
        warm_output, warm = timed_run(containerd, "liftoff", ref, "bench-warm", command, namespace)
        warm_fused_cpu = cpu_seconds(fused.process.pid) - cpu_before
        after = _view_requests(fused_client.status())
        warm_requests = {name: count - requests.get(name, 0) for name, count in after.items() if count > requests.get(name, 0)}
        prefetch_s = status.prefetch.profile_seconds
        return Sample(
            pull,
            run,
            warm,
            registry_bytes,
            store_bytes,
            fused_cpu,
            requests,
            prefetch_s,
            run_output,
            warm_output,
            warm_requests,
            warm_fused_cpu,
        )


def _view_requests(status) -> dict[str, int]:
    """FUSE requests by opcode, summed over the daemon's views."""
    requests: dict[str, int] = {}
    for view in status.views:
        for name, count in view.requests.items():
            requests[name] = requests.get(name, 0) + count
    return requests


def timed_run(containerd, snapshotter: str, ref: str, name: str, command: list[str], namespace: str = "default"):
    """`ctr run --rm` a container: (seconds until it printed its first line, seconds until ctr returned: the
    container's exit and teardown included)."""
    argv = ["ctr", "--address", containerd.address, "--namespace", namespace, "run", "--rm", "--snapshotter", snapshotter]
    started = time.monotonic()
    with subprocess.Popen([*argv, *run_args(name), ref, name, *command], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL) as ctr:
        assert ctr.stdout is not None
        ctr.stdout.readline()
        output = time.monotonic() - started
        ctr.stdout.read()
        if ctr.wait(300) != 0:
            raise RuntimeError(f"ctr run {name} failed ({ctr.returncode})")
    return output, time.monotonic() - started


def _thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each of a process's threads, by thread id."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found[int(task.name)] = cpu_seconds_of(task / "stat")
    return found


class DaemonSampler:
    """py-spy sampling the daemon's Python stacks (`--gil`: the thread holding the GIL) into PROFILE_DIR/<name>.txt
    (collapsed stacks; thread ids in the frames), and each thread's CPU seconds into <name>-threads.json."""

    def __init__(self, pid: int, name: str) -> None:
        assert PROFILE_DIR is not None
        PROFILE_DIR.mkdir(parents=True, exist_ok=True)
        self.pid, self.out = pid, PROFILE_DIR / name
        py_spy = Path(sys.executable).with_name("py-spy")
        argv = [str(py_spy), "record", "--pid", str(pid), "--rate", "250", "--gil", "--threads", "--format", "raw"]
        self.process = subprocess.Popen([*argv, "-o", f"{self.out}.txt"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # py-spy attaches
        self.before = _thread_cpu(pid)

    def stop(self) -> None:
        after = _thread_cpu(self.pid)
        self.process.send_signal(signal.SIGINT)
        self.process.wait(60)
        spent = {tid: round(cpu - self.before.get(tid, 0.0), 3) for tid, cpu in after.items()}
        Path(f"{self.out}-threads.json").write_text(json.dumps(spent))


def _sample_daemon(pid: int, name: str) -> DaemonSampler | None:
    return DaemonSampler(pid, name) if PROFILE_DIR is not None else None


def prepare(layout: Path, images: list[str], registry, root: Path) -> dict[str, dict]:
    """Push the images, convert them into two store prefixes (with and without a profile), record profiles."""
    info = {}
    for name in images:
        ref = push_layout(layout, name, registry.host, f"bench/{name}")
        for prefix in ("plain", "profiled"):
            liftoff("convert", ref, "--plain-http", "--store", f"file://{root / BUCKET / prefix}")
        liftoff("profile", ref, "--plain-http", "--store", f"file://{root / BUCKET / 'profiled'}", "--", *COMMANDS[name])
        summary = json.loads(liftoff("inspect", ref, "--store", f"file://{root / BUCKET / 'plain'}", "--json"))
        info[name] = {
            "repository": f"bench/{name}",
            "stored_bytes": summary["images"][0]["stored_bytes"],
            "tar_bytes": summary["images"][0]["tar_bytes"],
        }
    return info


def layer_bytes(layout: Path, tag: str) -> int:
    index = json.loads((layout / "index.json").read_text())
    digest = next(m["digest"] for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
    manifest = json.loads((layout / "blobs" / "sha256" / digest.split(":")[1]).read_text())
    return sum(layer["size"] for layer in manifest["layers"])


def median_text(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--images", default="torch,python")
    parser.add_argument("--settings", default="unshaped,shaped")
    parser.add_argument("--keys", default="a,b,c,d", help="which of (a)-(d) to run (a and c always run)")
    parser.add_argument("--out", type=Path, default=WORK.parent / "coldstart.json")
    parser.add_argument("--plot", type=Path, help="the timeline picture (PNG; default: --out with .png)")
    args = parser.parse_args()
    images = args.images.split(",")
    keys = set(args.keys.split(",")) | {"a", "c"}
    settings = {"unshaped": UNSHAPED, "shaped": SHAPED}
    layout = ensure_images()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    os.environ.update(AWS)
    registry = start_registry(WORK / "registry")
    store_root = WORK / "store"
    WARM[:] = [registry.root, store_root]
    nginx = start_nginx(store_root)
    report: dict = {"date": date.today().isoformat(), "machine": machine(), "runs": args.runs, "results": {}}
    try:
        info = prepare(layout, images, registry, store_root)
        for setting in args.settings.split(","):
            shaping: Shaping = settings[setting]
            with (
                ShapingProxy(("127.0.0.1", int(registry.host.split(":")[1])), shaping) as registry_proxy,
                ShapingProxy(("127.0.0.1", nginx.port), shaping) as store_proxy,
            ):
                endpoint = f"http://127.0.0.1:{store_proxy.port}"
                for name in images:
                    ref = f"127.0.0.1:{registry_proxy.port}/{info[name]['repository']}:{name}"
                    results = Results()
                    for run in range(args.runs):
                        base = WORK / f"{setting}-{name}-{run}"
                        results.add("a", measure_overlayfs(ref, COMMANDS[name], base / "overlayfs", registry_proxy))
                        for key, prefix, fused_args in (
                            ("b", "plain", []),
                            ("c", "profiled", ["--passthrough"]),
                            ("d", "profiled", ["--no-passthrough"]),
                        ):
                            if key not in keys:
                                continue
                            store = f"s3://{BUCKET}/{prefix}?endpoint_url={endpoint}&path_style=true"
                            sample = measure_liftoff(
                                ref, COMMANDS[name], base / key, store, registry_proxy, store_proxy, fused_args
                            )
                            results.add(key, sample)
                        shutil.rmtree(base, ignore_errors=True)
                    report["results"][f"{setting}/{name}"] = {k: [s.__dict__ for s in v] for k, v in results.samples.items()}
                    print_table(setting, name, results, layer_bytes(layout, name), info[name])
    finally:
        nginx.stop()
        registry.stop()
    write_report(report, args.out, args.plot)


def print_table(setting: str, name: str, results: Results, compressed: int, info: dict) -> None:
    labels = {
        "a": "(a) overlayfs pull+run",
        "b": "(b) liftoff, no profile",
        "c": "(c) liftoff + profile",
        "d": "(d) (c), --no-passthrough",
    }
    rows = sample_rows(results, labels, compressed)
    a, c = results.samples["a"], results.samples["c"]

    def ratio(f) -> float:
        return statistics.median(f(s) for s in a) / statistics.median(f(s) for s in c)

    print(
        f"\n{name} image, {setting}: {compressed / 1e6:.0f} MB compressed (registry), "
        f"{info['stored_bytes'] / 1e6:.0f} MB in the store, {info['tar_bytes'] / 1e6:.0f} MB unpacked"
    )
    print(
        table(
            [
                "",
                "pull s",
                "run: output s",
                "run: exit s",
                "pull+run s",
                "warm: output s",
                "warm: exit s",
                "fetched (of compressed)",
                "fused CPU s",
                "FUSE requests",
            ],
            rows,
        )
    )
    warm_a = statistics.median(s.warm for s in a)
    print(
        f"ratios (a)/(c): pull {ratio(lambda s: s.pull):.1f}x, pull+first run {ratio(lambda s: s.total):.1f}x; "
        f"warm run liftoff/overlayfs {statistics.median(s.warm for s in c) / warm_a:.2f}x; "
        f"first run liftoff(c)/overlayfs warm run {statistics.median(s.run for s in c) / warm_a:.2f}x",
        flush=True,
    )


def write_report(report: dict, out: Path, plot: Path | None) -> None:
    """The results as JSON at `out` and their timeline picture (`plot`, default `out` with .png)."""
    out.write_text(json.dumps(report, indent=1))
    picture = coldstart_plot(report, plot or out.with_suffix(".png"))
    print(f"machine: {machine()}; load average {load_average():.1f}; results in {out}, timeline in {picture}")


def sample_rows(results: Results, labels: dict[str, str], compressed: int) -> list[list[str]]:
    """One table row per contender in `labels` that ran: medians (min-max) and what it fetched; (a) has no daemon."""
    rows = []
    for key, label in labels.items():
        samples = results.samples.get(key)
        if not samples:
            continue
        fetched = statistics.median(s.registry_bytes + s.store_bytes for s in samples)
        rows.append(
            [
                label,
                median_text([s.pull for s in samples]),
                median_text([s.run_output for s in samples]),
                median_text([s.run for s in samples]),
                median_text([s.total for s in samples]),
                median_text([s.warm_output for s in samples]),
                median_text([s.warm for s in samples]),
                f"{fetched / 1e6:.1f} MB ({fetched / compressed:.1%})",
                median_text([s.fused_cpu for s in samples]) if key != "a" else "-",
                _requests_text(samples) if key != "a" else "-",
            ]
        )
    return rows


def _requests_text(samples: list[Sample]) -> str:
    """Median FUSE requests by opcode, most frequent first."""
    medians = {n: statistics.median(s.requests.get(n, 0) for s in samples) for s in samples for n in s.requests}
    return " ".join(f"{n}={m:.0f}" for n, m in sorted(medians.items(), key=lambda item: -item[1]))


if __name__ == "__main__":
    main()
