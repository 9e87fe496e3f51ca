#!/usr/bin/env python3
"""End-to-end scale-up: from "a new replica is needed" to "the replica answered its first request".

    scripts/bench scaleup [--runs 3] [--settings unshaped,shaped] [--model-gb 1.6] [--no-ray]
    scripts/bench scaleup --seed [--runs 3] [--model-gb 7]      # the seeds' scale (see below)

The replica is a container (containerd + runc) of the `server` image: the torch image of
benchmarks/build_images.py plus liftoff (a wheel of this repository), boto3 and safetensors,
running `python3 -m serve_integration.examples.server` with a TinyLM checkpoint of ~1.6 GB (fp32)
from the store. Both the registry and the store (nginx serving a directory, path-style S3)
sit behind the shaping proxy; fresh containerd and liftoff state and dropped page caches per run.

  baseline: `ctr image pull` (overlayfs), `ctr run`, in the container boto3 download_file of
            the checkpoint to disk and safetensors load (the seed's "KubeRay on EKS" + `aws s3 cp`)
  liftoff:  `liftoff pull` (converted image, startup profile), `ctr run --snapshotter liftoff`,
            weights streamed with weightstream

Phases: pull, container start (to the server process's first instruction), weight load, first
response. Then, unless --no-ray: a Ray Serve autoscaling run with the CPU twin on a local
multi-node Ray cluster (traffic rises, Serve adds a replica), timing the new replica to ready
with weightstream vs download-then-load.

--seed: the seeds' scale. The replica image is the vLLM image of benchmarks/seedscale.py (build_images --vllm:
~4.6 GB gzip, ~10 GB, ~110k files) plus liftoff and boto3, and the server imports vllm before it loads (as a vLLM
replica's process does); the checkpoint is ~7 GB (fp32 TinyLM: its warm-up generation on 2 cores stays ~1-2 s);
the node's containerd, liftoff state and the container's disk are on the emulated gp3 volume (benchmarks/gp3.py);
the remote is shaped at 20 ms + 100 MB/s per connection + 1.25 GB/s. The baseline's download is tuned as the seed
tuned `aws s3 cp` (64 requests, 16 MB parts) and runs twice: page cache kept after the download, and dropped (the
files flushed and evicted before safetensors reads them back from the gp3 disk). No Ray run.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

from benchmarks import coldstart
from benchmarks.benchlib import drop_caches, liftoff_node, load_average, machine, table
from benchmarks.build_images import Chroot, download_wheels, ensure_images, ensure_vllm_image, run
from benchmarks.gp3 import Gp3Disk
from benchmarks.shaping_proxy import SEED_SHAPED, SHAPED, UNSHAPED, ShapingProxy
from liftoff.devstack.services import free_port, push_layout, start_nginx, start_registry
from snapshotter.localnode import start_containerd

ROOT = Path(__file__).resolve().parent.parent
WORK = Path("/var/tmp/liftoff-bench/scaleup")
LIFTOFF = [sys.executable, "-m", "liftoff"]
BUCKET = "liftoff-bench"
WARM: list[Path] = []  # the emulated remote servers' directories: kept in the page cache across runs
AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
SERVER_DEPS = ["boto3==1.44.5", "safetensors==0.8.0"]
SEED_SERVER_DEPS = ["boto3==1.44.5"]  # the vLLM image has its own safetensors
SERVER_IMPORTS: list[str] = []  # --seed: ["vllm"], imported by the server before it loads
PULL_TIMEOUT = 1800.0


def liftoff(*args: str) -> str:
    done = subprocess.run([*LIFTOFF, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"liftoff {' '.join(args[:2])} failed: {done.stderr[-2000:]}")
    return done.stdout


# -- the server image ---------------------------------------------------------------------------------


def source_hash() -> str:
    digest = hashlib.sha256()
    for package in ("layerstore", "weightstream", "serve_integration"):
        for path in sorted((ROOT / package).rglob("*.py")):
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def ensure_server_image(base: Path, base_tag: str = "torch", in_place: bool = False) -> tuple[Path, str]:
    """An OCI layout with tag `server-<hash>`: `base_tag` plus liftoff, boto3 (and safetensors), cached by source
    hash. `in_place`: the tag is added to `base` itself (the layers are shared; for the 10 GB vLLM image)."""
    tag = f"server-{source_hash()}"
    layout = base if in_place else WORK.parent / "server-images"
    deps = SEED_SERVER_DEPS if in_place else SERVER_DEPS
    if (layout / "index.json").exists() and tag in (layout / "index.json").read_text():
        return layout, tag
    if not in_place:
        shutil.rmtree(layout, ignore_errors=True)
        shutil.copytree(base, layout)
    wheels = Path(WORK.parent / "server-wheels")
    shutil.rmtree(wheels, ignore_errors=True)
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT))
    download_wheels(wheels, *deps)
    bundle = WORK.parent / "server-bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    run("umoci", "unpack", "--image", f"{layout}:{base_tag}", str(bundle))
    try:
        with Chroot(bundle / "rootfs", wheels) as chroot:
            names = sorted(p.name for p in wheels.glob("*.whl"))
            chroot(
                "/opt/venv/bin/pip",
                "install",
                "-q",
                "--no-index",
                "--no-compile",
                "--find-links",
                "/tmp/wheels",
                *[f"/tmp/wheels/{n}" for n in names if n.startswith(("liftoff-", "liftoff_"))],
                "--no-deps",
            )
            chroot("/opt/venv/bin/pip", "install", "-q", "--no-index", "--no-compile", "--find-links", "/tmp/wheels", *deps)
        run("umoci", "repack", "--refresh-bundle", "--image", f"{layout}:{tag}", str(bundle))
        run("umoci", "gc", "--layout", str(layout))
    finally:
        shutil.rmtree(bundle, ignore_errors=True)
    return layout, tag


# -- one replica start ---------------------------------------------------------------------------------


@dataclass
class Sample:
    pull: float
    start: float  # container created -> server process running
    imports: float  # the server's imports (torch, the loader's libraries)
    load: float  # weights loaded (download + load, or streamed)
    warmup: float  # one warm-up generation before the server says it is ready
    respond: float  # ready -> first response
    total: float


def wait_health(port: int, deadline: float) -> dict:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                return json.loads(response.read())
        except OSError:
            time.sleep(0.02)
    raise TimeoutError("the replica never became ready")


def first_response(port: int) -> None:
    body = json.dumps({"prompt": "liftoff", "max_new_tokens": 1}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=120) as response:
        json.loads(response.read())


def replica(containerd, ref: str, snapshotter: str, model_url: str, loader: str, pull) -> Sample:
    port = free_port()
    started = time.monotonic()
    wall0 = time.time()
    pull()
    pulled = time.monotonic()
    env = [a for k, v in AWS.items() for a in ("--env", f"{k}={v}")]
    argv = [
        "ctr",
        "--address",
        containerd.address,
        "run",
        "-d",
        "--net-host",
        "--snapshotter",
        snapshotter,
        *coldstart.run_args(f"replica-{port}"),
        *env,
        ref,
        f"replica-{port}",
        "python3",
        "-m",
        "serve_integration.examples.server",
        "--model-url",
        model_url,
        "--loader",
        loader.removesuffix("-evict"),
        "--port",
        str(port),
        *[a for m in SERVER_IMPORTS for a in ("--import", m)],
        *([] if loader != "download-evict" else ["--evict"]),
    ]
    subprocess.run(argv, check=True, capture_output=True)
    health = wait_health(port, time.monotonic() + 600)
    ready = time.monotonic()
    first_response(port)
    done = time.monotonic()
    remove_container(containerd, f"replica-{port}")
    start = health["started_at"] - (wall0 + (pulled - started))
    return Sample(
        pull=pulled - started,
        start=max(0.0, start),
        imports=health["imported_at"] - health["started_at"],
        load=health["loaded_at"] - health["imported_at"],
        warmup=health["warmed_at"] - health["loaded_at"],
        respond=done - ready,
        total=done - started,
    )


def remove_container(containerd, name: str) -> None:
    """Kill the replica and delete its task and container (else the shim outlives containerd with the rootfs mounted)."""
    ctr = ["ctr", "--address", containerd.address]
    subprocess.run([*ctr, "task", "kill", "-s", "SIGKILL", name], capture_output=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if subprocess.run([*ctr, "task", "delete", name], capture_output=True).returncode == 0:
            break
        time.sleep(0.1)
    subprocess.run([*ctr, "container", "delete", name], capture_output=True)


def run_baseline(base: Path, ref: str, model_url: str, loader: str = "download") -> Sample:
    containerd = start_containerd(base / "containerd")
    try:
        drop_caches(WARM)
        return replica(
            containerd,
            ref,
            "overlayfs",
            model_url,
            loader,
            lambda: containerd.ctr("image", "pull", "--plain-http", "--snapshotter", "overlayfs", ref, timeout=PULL_TIMEOUT),
        )
    finally:
        containerd.stop()


def run_liftoff(base: Path, ref: str, store: str, model_url: str) -> Sample:
    with liftoff_node(base, store) as containerd:
        drop_caches(WARM)
        return replica(
            containerd,
            ref,
            "liftoff",
            model_url,
            "weightstream",
            lambda: liftoff("pull", ref, "--address", containerd.address, "--plain-http"),
        )


# -- Ray Serve autoscaling ---------------------------------------------------------------------------------


def ray_autoscaling(model_url: str) -> dict:
    """A 3-node local Ray cluster; traffic makes Serve add a TinyLM replica; its time to ready per loader."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from serve_integration.examples.twin import build_twin_app
    from serve_integration.replica import ReplicaOptions

    results = {}
    for loader in ("download", "weightstream"):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, runtime_env={"env_vars": AWS}, log_to_driver=False)
        port = free_port()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            options = ReplicaOptions(
                min_replicas=1,
                max_replicas=2,
                initial_replicas=1,
                target_ongoing_requests=1,
                upscale_delay_s=0.5,
                downscale_delay_s=600,
                num_cpus=1,
                max_ongoing_requests=4,
            )
            serve.run(build_twin_app(model_url, options, loader=loader), name="twin", route_prefix="/twin")
            asked = time.monotonic()
            stop = time.monotonic() + 300
            seen: set[int] = set()
            import threading

            def load(port=port, stop=stop, seen=seen, loader=loader, asked=asked) -> None:
                body = json.dumps({"prompt": "liftoff", "max_new_tokens": 8}).encode()
                while time.monotonic() < stop and len(seen) < 2:
                    request = urllib.request.Request(f"http://127.0.0.1:{port}/twin", data=body, method="POST")
                    with urllib.request.urlopen(request, timeout=300) as response:
                        answer = json.loads(response.read())
                    seen.add(answer["replica"]["pid"])
                    if len(seen) == 2 and loader not in results:
                        results[loader] = {
                            "second_replica_serving_s": round(time.monotonic() - asked, 2),
                            "load_seconds": answer["replica"]["load_seconds"],
                        }

            threads = [threading.Thread(target=load) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            serve.shutdown()
            ray.shutdown()
            cluster.shutdown()
    return results


# -- main -----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--settings", default="unshaped,shaped")
    parser.add_argument("--model-gb", type=float, default=1.6, help="checkpoint size (fp32 TinyLM)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Serve autoscaling run")
    parser.add_argument("--out", type=Path, default=WORK.parent / "scaleup.json")
    parser.add_argument("--seed", action="store_true", help="the seeds' scale: vLLM image, gp3 node disk (see above)")
    args = parser.parse_args()
    os.environ.update(AWS)
    if args.seed:
        layout, tag = ensure_server_image(ensure_vllm_image(), "vllm", in_place=True)
        SERVER_IMPORTS[:] = ["vllm"]
        settings = {"shaped": SEED_SHAPED}
        args.no_ray = True
    else:
        layout, tag = ensure_server_image(ensure_images())
        settings = {"unshaped": UNSHAPED, "shaped": SHAPED}
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    store_root = WORK / "store"
    from serve_integration.examples.tinylm import TinyConfig, parameter_bytes, save_checkpoint

    layers = max(1, round(args.model_gb * 1e9 / parameter_bytes(TinyConfig(dim=2048, layers=1, heads=16))))
    config = TinyConfig(dim=2048, layers=layers, heads=16)
    save_checkpoint(store_root / BUCKET / "models" / "tiny", config, seed=1)
    model_bytes = parameter_bytes(config)
    registry = start_registry(WORK / "registry")
    nginx = start_nginx(store_root)
    report = {"date": date.today().isoformat(), "machine": machine(), "model_bytes": model_bytes, "results": {}}
    try:
        ref0 = push_layout(layout, tag, registry.host, "bench/server")
        liftoff("convert", ref0, "--plain-http", "--store", f"file://{store_root / BUCKET / 'images'}")
        nginx_url = f"http://127.0.0.1:{nginx.port}"
        model0 = f"s3://{BUCKET}/models/tiny/?endpoint_url={nginx_url}&path_style=true"
        # the profile records a real start of the server, weights streamed (they are not in the image)
        liftoff(
            "profile",
            ref0,
            "--plain-http",
            "--store",
            f"file://{store_root / BUCKET / 'images'}",
            "--net-host",
            "--until-line",
            "ready:",
            "--",
            "python3",
            "-m",
            "serve_integration.examples.server",
            "--model-url",
            model0,
            "--port",
            str(free_port()),
            *[a for m in SERVER_IMPORTS for a in ("--import", m)],
        )
        disk = Gp3Disk(WORK / "gp3", size_gb=56) if args.seed else contextlib.nullcontext()
        contenders = ["baseline", "baseline-evict", "liftoff"] if args.seed else ["baseline", "liftoff"]
        for setting in ["shaped"] if args.seed else args.settings.split(","):
            shaping = settings[setting]
            with (
                disk,
                ShapingProxy(("127.0.0.1", int(registry.host.split(":")[1])), shaping) as registry_proxy,
                ShapingProxy(("127.0.0.1", nginx.port), shaping) as store_proxy,
            ):
                endpoint = f"http://127.0.0.1:{store_proxy.port}"
                ref = f"127.0.0.1:{registry_proxy.port}/bench/server:{tag}"
                store = f"s3://{BUCKET}/images?endpoint_url={endpoint}&path_style=true"
                model_url = f"s3://{BUCKET}/models/tiny/?endpoint_url={endpoint}&path_style=true"
                node_root = disk.mountpoint if args.seed else WORK
                if args.seed:
                    report["disk"] = {"describe": disk.describe(), **disk.check()}
                    coldstart.run_args = disk.ctr_run_args  # the replica reads the node disk under its limits too
                samples: dict[str, list[Sample]] = {name: [] for name in contenders}
                for i in range(args.runs):
                    for name in contenders:
                        base = node_root / f"{setting}-{name}-{i}"
                        # the emulated remote keeps in the page cache what this contender reads from it
                        WARM[:] = [store_root / BUCKET / "models"]
                        WARM.append(store_root / BUCKET / "images" if name == "liftoff" else registry.root)
                        if name == "liftoff":
                            sample = run_liftoff(base, ref, store, model_url)
                        else:
                            sample = run_baseline(base, ref, model_url, name.replace("baseline", "download"))
                        samples[name].append(sample)
                        print(f"run {i} {name}: {asdict(sample)} (load {load_average():.1f})", flush=True)
                        shutil.rmtree(base, ignore_errors=True)
                report["results"][setting] = {k: [asdict(s) for s in v] for k, v in samples.items()}
                print_table(setting, samples, model_bytes)
        if not args.no_ray:
            try:
                report["ray_autoscaling"] = ray_autoscaling(
                    f"s3://{BUCKET}/models/tiny/?endpoint_url=http://127.0.0.1:{nginx.port}&path_style=true"
                )
            except Exception as e:  # the container results above stand on their own
                report["ray_autoscaling"] = {"error": repr(e)}
            print(
                "\nRay Serve autoscaling (CPU twin, local 3-node cluster, unshaped): time from the traffic rise to "
                "the second replica answering"
            )
            for loader, result in report["ray_autoscaling"].items():
                print(f"  {loader:13} {result}")
    finally:
        nginx.stop()
        registry.stop()
    args.out.write_text(json.dumps(report, indent=1))
    print(f"machine: {machine()}; load average {load_average():.1f}; results in {args.out}")


def print_table(setting: str, samples: dict[str, list[Sample]], model_bytes: int) -> None:
    def med(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    rows = []
    for name, label in (
        ("baseline", "overlayfs pull + download (kept in page cache) + safetensors"),
        ("baseline-evict", "overlayfs pull + download (page cache dropped) + safetensors"),
        ("liftoff", "liftoff pull (profile) + weightstream"),
    ):
        s = samples.get(name)
        if not s:
            continue
        rows.append(
            [
                label,
                med([x.pull for x in s]),
                med([x.start for x in s]),
                med([x.imports for x in s]),
                med([x.load for x in s]),
                med([x.warmup for x in s]),
                med([x.respond for x in s]),
                med([x.total for x in s]),
            ]
        )
    print(f"\n{setting}: model {model_bytes / 1e9:.2f} GB")
    headers = ["replica", "pull s", "container start s", "imports s", "weight load s", "warm-up s", "first response s"]
    print(table([*headers, "end to end s"], rows))
    liftoff_total = statistics.median(x.total for x in samples["liftoff"])
    for name in ("baseline", "baseline-evict"):
        if samples.get(name):
            ratio = statistics.median(x.total for x in samples[name]) / liftoff_total
            print(f"end to end, liftoff vs {name}: {ratio:.1f}x faster", flush=True)


if __name__ == "__main__":
    main()
