"""`liftoff demo`: the whole story on embedded defaults, on this machine.

A local docker-registry and S3 server, a sample image built here (busybox from
Debian's busybox-static, a runtime layer of libraries, an app), `liftoff convert`
into the S3 store and `liftoff profile` (its startup profile), then side by side in
containerd: a plain overlayfs pull + run, and a lazy `liftoff pull` + run through the
liftoff snapshotter. Prints the timings and what each fetched.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from layerstore.errors import LiftoffError
from liftoff.devstack.ocibuild import LayoutWriter, Member, make_tar
from liftoff.devstack.services import push_layout, start_registry, start_s3
from snapshotter.localnode import start_containerd, start_snapshotter

BUSYBOX = Path("/bin/busybox")
APPLETS = ["sh", "cat", "echo", "ls", "wc", "head", "sha256sum"]
APP = b"""#!/bin/sh
echo "sample app: started lazily"
head -c 262144 /opt/runtime/lib/libmodel-03.so | sha256sum | cut -c1-16
cat /opt/runtime/VERSION
"""


def sample_layers(runtime_mb: int = 160) -> list[bytes]:
    """busybox, a runtime of `runtime_mb` MB of libraries (the app reads a few percent), the app."""
    if not BUSYBOX.exists():
        raise LiftoffError("the demo image needs /bin/busybox: apt-get install busybox-static (scripts/bootstrap does)")
    base = make_tar(
        [
            Member("bin", "dir"),
            Member("bin/busybox", data=BUSYBOX.read_bytes(), mode=0o755),
            *[Member(f"bin/{name}", "symlink", linkname="busybox") for name in [*APPLETS, "cut"]],
            Member("etc", "dir"),
            Member("etc/hostname", data=b"liftoff-demo\n"),
            Member("tmp", "dir", mode=0o1777),
        ]
    )
    rng = random.Random(2026)
    words = [rng.randbytes(64) for _ in range(512)]  # compressible, like real binaries
    libs = [Member("opt", "dir"), Member("opt/runtime", "dir"), Member("opt/runtime/lib", "dir")]
    per_lib = max(1, runtime_mb // 8) << 20
    for i in range(8):
        data = b"".join(rng.choice(words) for _ in range(per_lib // 64))
        libs.append(Member(f"opt/runtime/lib/libmodel-{i:02d}.so", data=data, mode=0o755))
    libs += [Member(f"opt/runtime/share/doc-{i:03d}.txt", data=f"doc {i}\n".encode() * 50) for i in range(200)]
    libs.insert(3, Member("opt/runtime/share", "dir"))
    libs.append(Member("opt/runtime/VERSION", data=b"runtime 1.0\n"))
    runtime = make_tar(libs)
    app = make_tar([Member("app", "dir"), Member("app/start.sh", data=APP, mode=0o755)])
    return [base, runtime, app]


def _liftoff(*args: str, env: dict | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "liftoff", *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if done.returncode != 0:
        raise LiftoffError(f"liftoff {args[0]} failed: {done.stderr.strip()}")
    return done.stdout


def _drop_caches() -> None:
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
    except OSError:
        pass


def stream_sample_model(work: Path, s3, say) -> dict:
    """5. A small language model's weights from the S3 server into memory: weightstream vs download-then-load."""
    from serve_integration.examples.tinylm import TinyConfig, save_checkpoint
    from serve_integration.examples.twin import load_downloading, load_streaming

    config = TinyConfig(dim=1024, layers=4, heads=8)
    reference = save_checkpoint(work / "model", config, seed=3)
    client = s3.client()
    for path in (work / "model").iterdir():
        client.upload_file(str(path), "liftoff-demo", f"models/tiny/{path.name}")
    url = f"s3://liftoff-demo/models/tiny/?endpoint_url={s3.endpoint}&path_style=true"
    size = sum(p.stat().st_size for p in (work / "model").glob("*.safetensors"))
    timings = {}
    for name, load in (("download to disk, then load", load_downloading), ("weightstream (no disk)", load_streaming)):
        started = time.monotonic()
        model = load(url)
        timings[name] = time.monotonic() - started
        if model.generate("liftoff", 4) != reference.generate("liftoff", 4):
            raise LiftoffError(f"the model loaded by {name} differs from the one written")
    say(f"5. a {size / 1e6:.0f} MB safetensors model from the S3 server into memory (the same weights both ways):")
    for name, seconds in timings.items():
        say(f"     {name:30}{seconds:7.2f} s")
    return {"model_bytes": size, **{f"model_{k.split()[0]}_seconds": v for k, v in timings.items()}}


def run_demo(workdir: Path | None = None, keep: bool = False) -> dict:
    """Run the demo; returns the measured numbers (also printed)."""
    if os.geteuid() != 0:
        raise LiftoffError("the demo runs containerd, FUSE and mounts: run it as root")
    work = Path(workdir or tempfile.mkdtemp(prefix="liftoff-demo-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    services = []
    results: dict = {}
    try:
        say = lambda text: print(text, flush=True)  # noqa: E731
        say(f"liftoff demo in {work}")
        registry = start_registry(work / "registry")
        services.append(registry)
        s3 = start_s3(work / "s3")
        services.append(s3)
        env = s3.env()
        os.environ.update(env)
        s3.create_bucket("liftoff-demo")
        store = "s3://liftoff-demo/store?path_style=true"
        say(f"  registry {registry.host}, S3 server {s3.endpoint}, store {store}")

        layers = sample_layers()
        writer = LayoutWriter(work / "layout")
        writer.tag(writer.add_image(layers, config={"Env": ["PATH=/bin"], "Cmd": ["/app/start.sh"]}), "v1")
        ref = push_layout(work / "layout", "v1", registry.host, "demo/sample-app")
        say(f"1. built and pushed {ref}: 3 layers, {sum(map(len, layers)) / 1e6:.1f} MB of tar")

        started = time.monotonic()
        summary = json.loads(_liftoff("convert", ref, "--plain-http", "--store", store, "--json"))
        results["convert_seconds"] = time.monotonic() - started
        say(
            f"2. liftoff convert: {summary['files']} files into {summary['chunks_total']} chunks, "
            f"{summary['bytes_uploaded'] / 1e6:.1f} MB uploaded in {results['convert_seconds']:.2f} s"
        )

        started = time.monotonic()
        profile = json.loads(_liftoff("profile", ref, "--plain-http", "--store", store, "--json"))
        results["profile_seconds"] = time.monotonic() - started
        say(
            f"   liftoff profile: a start of the image read {len(profile['files'])} files; its startup profile is "
            f"{len(profile['chunks'])} chunks ({sum(c['stored'] for c in profile['chunks']) / 1e6:.2f} MB) "
            f"[{results['profile_seconds']:.1f} s]"
        )

        socket = work / "run" / "snapshotter.sock"
        snapshotter = start_snapshotter(
            work / "snapshotter", socket, workdir=work, log_level="info", extra_args=["--store", store]
        )
        services.append(snapshotter)
        containerd = start_containerd(work / "containerd", socket)
        services.append(containerd)
        say("3. containerd started with the liftoff snapshotter (proxy plugin) and its FUSE daemon")

        _drop_caches()
        before = registry.blob_gets()
        started = time.monotonic()
        containerd.ctr("image", "pull", "--plain-http", "--snapshotter", "overlayfs", ref)
        plain_pull = time.monotonic() - started
        started = time.monotonic()
        plain_out = containerd.ctr("run", "--rm", "--snapshotter", "overlayfs", ref, "demo-plain")
        plain_run = time.monotonic() - started
        blobs = registry.blob_gets() - before
        containerd.ctr("image", "rm", "--sync", ref)  # the config too, now: the lazy pull must fetch it

        _drop_caches()
        started = time.monotonic()
        _liftoff("pull", ref, "--address", containerd.address, "--plain-http", "--snapshotter", "liftoff")
        lazy_pull = time.monotonic() - started
        started = time.monotonic()
        lazy_out = containerd.ctr("run", "--rm", "--snapshotter", "liftoff", ref, "demo-lazy")
        lazy_run = time.monotonic() - started
        lazy_blobs = registry.blob_gets() - before - blobs

        from snapshotter.fuse_control import FusedClient

        fused = FusedClient(work / "snapshotter" / "remote" / "fused.sock")
        fetched = fused.status().fetch
        say("4. the sample app, started both ways:")
        for line in lazy_out.strip().splitlines():
            say(f"     | {line}")
        if plain_out != lazy_out:
            raise LiftoffError(f"the lazy start printed something else than the plain one:\n{plain_out}\n{lazy_out}")
        image_mb = sum(layer["bytes_in"] for layer in summary["images"][0]["layers"]) / 1e6
        results.update(
            plain_pull=plain_pull,
            plain_run=plain_run,
            lazy_pull=lazy_pull,
            lazy_run=lazy_run,
            fetched_bytes=fetched.bytes,
            fetched_chunks=fetched.chunks,
            lazy_blob_gets=lazy_blobs,
        )
        say("")
        say(f"   {'':28}{'pull s':>9}{'run s':>9}{'total s':>9}   fetched")
        say(
            f"   {'containerd overlayfs':28}{plain_pull:9.2f}{plain_run:9.2f}{plain_pull + plain_run:9.2f}   "
            f"{blobs} registry blob GETs (layers + config), {image_mb:.1f} MB unpacked"
        )
        say(
            f"   {'liftoff (lazy, profiled)':28}{lazy_pull:9.2f}{lazy_run:9.2f}{lazy_pull + lazy_run:9.2f}   "
            f"{lazy_blobs} registry blob GET (config), "
            f"{fetched.chunks} chunks = {fetched.bytes / 1e6:.2f} MB from the store"
        )
        results.update(stream_sample_model(work, s3, say))
        return results
    finally:
        from snapshotter.fuse_control import FusedClient

        for service in reversed(services):
            try:
                service.stop()
            except Exception as e:  # best effort teardown: report, go on
                print(f"  (stopping {type(service).__name__}: {e})", file=sys.stderr)
        FusedClient(work / "snapshotter" / "remote" / "fused.sock").shutdown()  # it outlives the snapshotter by design
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the demo: a sample image converted and started lazily, timed")
    p.add_argument("--workdir", type=Path, help="where to keep the demo's state (default: a temp dir, removed)")
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    p.set_defaults(run=lambda args: run_demo(args.workdir, args.keep) and 0)
