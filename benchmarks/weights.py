"""Weights benchmark (issue 7): safetensors from an S3-style endpoint into memory, side by side.

One command:

    .venv/bin/python benchmarks/weights.py            # full run: ~2 GB, single + 8 shards, unshaped + shaped
    .venv/bin/python benchmarks/weights.py --sweep    # range size x concurrency grid for liftoff (picks defaults)

The full run also draws GB/s per contender (--plot, default /var/tmp/liftoff-bench/weights.png).

A synthetic ~2 GB checkpoint (one file and the same tensors in 8 shards) is
written once under /var/tmp, in a file:// store directory served by Debian's
nginx with path-style URLs (/bucket/key), which answers boto3's
HeadObject/GetObject with Range (moto re-reads the whole object per range, so
it cannot measure speed). "unshaped" talks to nginx directly; "shaped" goes
through benchmarks/shaping_proxy.py (20 ms first byte per request, 100 MB/s
per connection, 1 GB/s total). Every contender runs in its own process, so
peak RSS is its own:

  (a) boto3 download_file to disk, then safetensors.torch.load_file
  (b) Run:ai Model Streamer at its defaults, and tuned (concurrency, chunk size, no memory limit)
  (c) liftoff: weightstream.load() (and weightstream streaming with bounded memory)
  (d) raw: N parallel plain ranged GETs into a discarded buffer (the limit)
  (d') raw-fresh: the same GETs into new memory, mapped and populated as weightstream's host sink does (the limit
       for a loader that must produce the checkpoint in new memory)

With CUDA, it also measures the pinned host-to-device copy bandwidth and
liftoff's host-to-device streaming rate from page-cached files.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.plots import BENCH_DIR, weights_plot  # noqa: E402
from benchmarks.shaping_proxy import SHAPED, UNSHAPED, ProxyProcess, Shaping  # noqa: E402
from liftoff.devstack.services import Nginx, start_nginx  # noqa: E402

BUCKET = "bench"
DEFAULT_DIR = Path("/var/tmp/liftoff-weights-bench")
MiB = 1 << 20
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


# -- the checkpoint ----------------------------------------------------------------------------------------
def tensor_plan(target_bytes: int) -> list[tuple[str, tuple[int, ...]]]:
    """A Llama-like bf16 layout (hidden 4096, MLP 11008) with as many layers as fit `target_bytes`."""
    hidden, inter, vocab = 4096, 11008, 32000
    per_layer = (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) * 2
    fixed = (2 * vocab * hidden + hidden) * 2
    layers = max(1, round((target_bytes - fixed) / per_layer))
    plan: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        plan += [(p + f"self_attn.{n}_proj.weight", (hidden, hidden)) for n in "qkvo"]
        plan += [(p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden))]
        plan += [(p + "mlp.down_proj.weight", (hidden, inter))]
        plan += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    plan += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return plan


def make_checkpoint(directory: Path, target_bytes: int) -> dict:
    """Write store/bench/{single,sharded}/ once (random bf16 bytes); returns the description."""
    marker = directory / "checkpoint.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("target_bytes") == target_bytes:
            return info
    import torch
    from safetensors.torch import save_file

    store = directory / "store" / BUCKET
    shutil.rmtree(store, ignore_errors=True)
    (store / "single").mkdir(parents=True)
    (store / "sharded").mkdir(parents=True)
    generator = torch.Generator().manual_seed(7)
    tensors = {}
    for name, shape in tensor_plan(target_bytes):
        n = 1
        for d in shape:
            n *= d
        tensors[name] = (
            torch.randint(0, 256, (n * 2,), dtype=torch.uint8, generator=generator).view(torch.bfloat16).reshape(shape)
        )
    save_file(tensors, str(store / "single" / "model.safetensors"), metadata={"format": "pt"})
    shards: list[dict] = [{} for _ in range(8)]
    sizes = [0] * 8
    for name, t in sorted(tensors.items(), key=lambda kv: -kv[1].numel()):
        i = sizes.index(min(sizes))
        shards[i][name] = t
        sizes[i] += t.numel() * 2
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-00008.safetensors"
        save_file(shard, str(store / "sharded" / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (store / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    info = {
        "target_bytes": target_bytes,
        "bytes": sum(sizes),
        "tensors": len(tensors),
        "single": ["single/model.safetensors"],
        "sharded": [f"sharded/{f}" for f in sorted(set(weight_map.values()))],
        "probe": {name: _probe(t) for name, t in list(tensors.items())[:4]},
    }
    marker.write_text(json.dumps(info, indent=1))
    return info


def _probe(tensor) -> str:
    """The first and last 64 bytes of a tensor, hex (a cheap check that the right bytes arrived)."""
    raw = tensor.reshape(-1).view(__import__("torch").uint8)
    return bytes(raw[:64].tolist() + raw[-64:].tolist()).hex()


# -- the contenders (each in its own process) -----------------------------------------------------------------
def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the parent across fork+exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _keys(info: dict, layout: str) -> list[str]:
    return info[layout]


def child_boto3(endpoint: str, info: dict, layout: str, scratch: Path) -> int:
    import boto3
    import botocore.config
    from safetensors.torch import load_file

    client = boto3.client("s3", endpoint_url=endpoint, config=botocore.config.Config(s3={"addressing_style": "path"}))
    scratch.mkdir(parents=True, exist_ok=True)
    state: dict = {}
    for key in _keys(info, layout):
        path = scratch / key.replace("/", "_")
        client.download_file(BUCKET, key, str(path))
        state.update(load_file(str(path)))
        path.unlink()
    return _check(state, info)


def child_runai(endpoint: str, info: dict, layout: str, tuned: bool) -> int:
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
            "RUNAI_STREAMER_S3_REQUEST_TIMEOUT_MS": "120000",
            "RUNAI_STREAMER_LOG_LEVEL": "WARNING",
        }
    )
    if tuned:
        os.environ.update(
            {
                "RUNAI_STREAMER_CONCURRENCY": "32",
                "RUNAI_STREAMER_CHUNK_BYTESIZE": str(16 * MiB),
                "RUNAI_STREAMER_MEMORY_LIMIT": "-1",
            }
        )
    from runai_model_streamer import SafetensorsStreamer

    state: dict = {}
    with SafetensorsStreamer() as streamer:
        streamer.stream_files([f"s3://{BUCKET}/{key}" for key in _keys(info, layout)])
        for name, tensor in streamer.get_tensors():
            state[name] = tensor
    return _check(state, info)


def liftoff_url(endpoint: str, layout: str) -> str:
    name = "single/model.safetensors" if layout == "single" else "sharded/model.safetensors.index.json"
    return f"s3://{BUCKET}/{name}?endpoint_url={endpoint}&path_style=true"


def child_liftoff(endpoint: str, info: dict, layout: str, stream: bool, tunables: dict) -> int:
    import weightstream

    with weightstream.open(liftoff_url(endpoint, layout), **tunables) as checkpoint:
        if not stream:
            return _check(checkpoint.load(), info)
        count = nbytes = 0
        for _, tensor in checkpoint:  # bounded memory: each tensor dropped as the next arrives
            _touch(tensor)
            count += 1
            nbytes += tensor.numel() * tensor.element_size()
        if count != info["tensors"] or nbytes != info["bytes"]:
            raise SystemExit(f"streamed {count} tensors / {nbytes} bytes, expected {info['tensors']} / {info['bytes']}")
        return nbytes


def child_raw(endpoint: str, info: dict, layout: str, concurrency: int, range_size: int, directory: Path) -> int:
    """N threads, each a keep-alive http.client connection, GET ranges and readinto one reused buffer."""
    import http.client
    import threading
    from urllib.parse import urlsplit

    store = directory / "store" / BUCKET
    work = []
    for key in _keys(info, layout):
        size = (store / key).stat().st_size
        work += [(key, start, min(size, start + range_size)) for start in range(0, size, range_size)]
    lock = threading.Lock()
    total = [0]
    netloc = urlsplit(endpoint).netloc

    def worker() -> None:
        conn = http.client.HTTPConnection(netloc, timeout=120)
        buf = memoryview(bytearray(range_size))
        while True:
            with lock:
                if not work:
                    break
                key, start, end = work.pop(0)
            conn.request("GET", f"/{BUCKET}/{key}", headers={"Range": f"bytes={start}-{end - 1}"})
            response = conn.getresponse()
            got = 0
            while got < end - start:
                n = response.readinto(buf[: end - start - got])
                if not n:
                    raise SystemExit(f"short read on {key}")
                got += n
            with lock:
                total[0] += got
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return total[0]


def child_raw_fresh(endpoint: str, info: dict, layout: str, concurrency: int, range_size: int, directory: Path) -> int:
    """Like child_raw, but every range lands in new memory that is kept, mapped and populated exactly as
    weightstream's host sink does (hostsink.map_host: THP-advised; hostsink.populate: MADV_POPULATE_WRITE with the
    GIL released, each piece just before its readinto, pieces of httpreader.PIECE): the fastest a loader that
    must produce the checkpoint in fresh memory could be on this machine."""
    import http.client
    import threading
    from urllib.parse import urlsplit

    from weightstream.hostsink import map_host, populate, writable
    from weightstream.httpreader import PIECE

    store = directory / "store" / BUCKET
    work = []
    for key in _keys(info, layout):
        size = (store / key).stat().st_size
        work += [(key, start, min(size, start + range_size)) for start in range(0, size, range_size)]
    lock = threading.Lock()
    kept: list = []
    netloc = urlsplit(endpoint).netloc

    def worker() -> None:
        conn = http.client.HTTPConnection(netloc, timeout=120)
        while True:
            with lock:
                if not work:
                    break
                key, start, end = work.pop(0)
            buf, lazy = map_host(end - start)
            view = writable(buf)
            conn.request("GET", f"/{BUCKET}/{key}", headers={"Range": f"bytes={start}-{end - 1}"})
            response = conn.getresponse()
            got = 0
            while got < end - start:
                piece = view[got : got + PIECE]
                if lazy:
                    populate(buf, got, got + len(piece))
                n = response.readinto(piece)
                if not n:
                    raise SystemExit(f"short read on {key}")
                got += n
            view.release()
            with lock:
                kept.append(buf)
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for buf in kept:  # consumed and kept like every contender's result: one byte per page read
        _touch(buf)
    RESULTS.append(kept)
    return sum(b.numel() for b in kept)


def _touch(tensor) -> int:
    """Read one byte per 4 KiB page: the least a consumer does (a lazily mapped file pays its page faults here)."""
    import torch

    return int(tensor.reshape(-1).view(torch.uint8)[::4096].sum()) if tensor.numel() else 0


RESULTS: list = []  # each contender's result stays alive until the process exits: freeing it is not loading


def _check(state: dict, info: dict) -> int:
    """Every contender's result is consumed the same way (pages touched) and checked (count, bytes, probes), and
    kept: a caller keeps what it loaded, so unmapping gigabytes is not part of any contender's time."""
    RESULTS.append(state)
    for tensor in state.values():
        _touch(tensor)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    if len(state) != info["tensors"] or nbytes != info["bytes"]:
        raise SystemExit(f"loaded {len(state)} tensors / {nbytes} bytes, expected {info['tensors']} / {info['bytes']}")
    for name, expected in info["probe"].items():
        if _probe(state[name]) != expected:
            raise SystemExit(f"tensor {name} differs from what was written")
    return nbytes


def run_child(args: argparse.Namespace) -> None:
    import torch  # noqa: F401 - imported before the clock starts, as a serving process would have it

    info = json.loads((args.dir / "checkpoint.json").read_text())
    tunables = json.loads(args.tunables or "{}")
    baseline = _peak_rss_mb()
    started = time.perf_counter()
    if args.child == "boto3":
        nbytes = child_boto3(args.endpoint, info, args.layout, args.dir / "download")
    elif args.child in ("runai", "runai-tuned"):
        nbytes = child_runai(args.endpoint, info, args.layout, args.child == "runai-tuned")
    elif args.child in ("liftoff", "liftoff-stream"):
        nbytes = child_liftoff(args.endpoint, info, args.layout, args.child == "liftoff-stream", tunables)
    elif args.child in ("raw", "raw-fresh"):
        run = child_raw if args.child == "raw" else child_raw_fresh
        nbytes = run(
            args.endpoint, info, args.layout, tunables.get("concurrency", 16), tunables.get("range_size", 16 * MiB), args.dir
        )
    else:
        raise SystemExit(f"unknown contender {args.child}")
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "bytes": nbytes, "peak_rss_mb": _peak_rss_mb(), "import_rss_mb": baseline}))


def measure(method: str, endpoint: str, layout: str, directory: Path, tunables: dict | None = None, timeout: float = 900) -> dict:
    argv = [sys.executable, __file__, "--child", method, "--endpoint", endpoint, "--layout", layout, "--dir", str(directory)]
    if tunables:
        argv += ["--tunables", json.dumps(tunables)]
    env = {**os.environ, **CREDENTIALS, "PYTHONPATH": str(ROOT)}
    env.pop("AWS_ENDPOINT_URL", None)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{method} ({layout}) failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["gbps"] = result["bytes"] / result["seconds"] / 1e9
    return result


# -- GPU -----------------------------------------------------------------------------------------------------
def gpu_report(directory: Path) -> list[str]:
    """Pinned host->device copy bandwidth vs liftoff streaming page-cached files into the GPU."""
    import torch

    if not torch.cuda.is_available():
        return ["GPU: no CUDA device here; the host-to-device measurement was not run."]
    import weightstream

    size = 1 << 30
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(size, dtype=torch.uint8, device="cuda")
    device.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(5):
        device.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    pinned = 5 * size / (time.perf_counter() - started) / 1e9
    del host, device
    path = directory / "store" / BUCKET / "single" / "model.safetensors"
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # into the page cache
    rates = []
    for _ in range(3):
        with weightstream.open(path) as checkpoint:
            started = time.perf_counter()
            state = checkpoint.load("cuda:0")
            torch.cuda.synchronize()
            rates.append(checkpoint.nbytes / (time.perf_counter() - started) / 1e9)
            del state
    stream = statistics.median(rates)
    return [
        f"GPU: {torch.cuda.get_device_name(0)}: pinned host->device copy {pinned:.2f} GB/s; "
        f"liftoff file->pinned ring->GPU {stream:.2f} GB/s ({stream / pinned:.0%} of the pinned copy)"
    ]


# -- the run -------------------------------------------------------------------------------------------------
METHODS = ["boto3", "runai", "runai-tuned", "liftoff", "liftoff-stream", "raw", "raw-fresh"]
LABELS = {
    "boto3": "(a) boto3 download_file + load_file",
    "runai": "(b) Run:ai streamer, defaults",
    "runai-tuned": "(b) Run:ai streamer, tuned",
    "liftoff": "(c) liftoff weightstream.load",
    "liftoff-stream": "(c) liftoff streaming (bounded memory)",
    "raw": "(d) raw parallel GETs (limit)",
    "raw-fresh": "(d') raw GETs into fresh memory (as hostsink populates it)",
}


def endpoints(nginx: Nginx, settings: list[str]):
    for setting in settings:
        shaping: Shaping = UNSHAPED if setting == "unshaped" else SHAPED
        if shaping is UNSHAPED:
            yield shaping, f"http://127.0.0.1:{nginx.port}", None
        else:
            proxy = ProxyProcess(("127.0.0.1", nginx.port), shaping)
            try:
                yield shaping, f"http://127.0.0.1:{proxy.port}", proxy
            finally:
                proxy.stop()


def run_sweep(args: argparse.Namespace, nginx: Nginx) -> None:
    print("| setting | range size | concurrency | GB/s (median) |")
    print("|---|---|---|---|")
    for shaping, endpoint, _ in endpoints(nginx, args.settings):
        for range_mib in (4, 8, 16, 32, 64):
            for concurrency in (4, 8, 16, 32):
                rates = [
                    measure(
                        "liftoff",
                        endpoint,
                        "single",
                        args.dir,
                        {
                            "range_size": range_mib * MiB,
                            "concurrency": concurrency,
                            "pool_bytes": max(256 * MiB, range_mib * MiB),
                        },
                    )["gbps"]
                    for _ in range(args.repeat)
                ]
                print(f"| {shaping.label} | {range_mib} MiB | {concurrency} | {statistics.median(rates):.2f} |", flush=True)


def run_main(args: argparse.Namespace, nginx: Nginx, info: dict) -> list[dict]:
    """Every contender in every setting and layout; prints the table and returns its rows (for the plot)."""
    rows: list[tuple[str, str, str, dict]] = []
    for shaping, endpoint, _ in endpoints(nginx, args.settings):
        for layout in args.layouts:
            results: dict[str, dict] = {}
            for method in args.methods:
                tunables = {"concurrency": 16, "range_size": 16 * MiB} if method.startswith("raw") else None
                runs = [measure(method, endpoint, layout, args.dir, tunables) for _ in range(args.repeat)]
                best = sorted(runs, key=lambda r: r["gbps"])[len(runs) // 2]  # the median run
                results[method] = best
                print(
                    f"{shaping.label:>45} {layout:>8} {LABELS[method]:<42} {best['gbps']:6.2f} GB/s "
                    f"{best['seconds']:6.2f} s  peak RSS {best['peak_rss_mb']:7.0f} MB  "
                    f"(all runs: {', '.join(format(r['gbps'], '.2f') for r in runs)})",
                    flush=True,
                )
            for method, result in results.items():
                rows.append((shaping.label, layout, method, result))
    print()
    print(
        f"Checkpoint: {info['bytes'] / 1e9:.2f} GB, {info['tensors']} bf16 tensors, single file and 8 shards; "
        f"median of {args.repeat} runs each.\n"
    )
    print("| network | layout | contender | GB/s | seconds | peak RSS (MB) | liftoff is x faster |")
    print("|---|---|---|---|---|---|---|")
    by_key = {(s, layout, m): r for s, layout, m, r in rows}
    for setting, layout, method, result in rows:
        mine = by_key.get((setting, layout, "liftoff"))
        ratio = ""
        if mine and method != "liftoff":
            ratio = (
                f"{mine['gbps'] / result['gbps']:.2f}x"
                if not method.startswith("raw")
                else f"liftoff = {mine['gbps'] / result['gbps']:.0%} of it"
            )
        print(
            f"| {setting} | {layout} | {LABELS[method]} | {result['gbps']:.2f} | {result['seconds']:.2f} | "
            f"{result['peak_rss_mb']:.0f} | {ratio} |"
        )
    for line in gpu_report(args.dir):
        print("\n" + line)
    return [
        {"setting": setting, "layout": layout, "contender": LABELS[method], "gbps": result["gbps"]}
        for setting, layout, method, result in rows
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description="issue 7 weights benchmark")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where the checkpoint and store live (not in the repo)")
    parser.add_argument("--size-gb", type=float, default=2.0, help="checkpoint size (default 2)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per contender (the median is reported)")
    parser.add_argument("--settings", default="unshaped,shaped", help="unshaped,shaped")
    parser.add_argument("--layouts", default="single,sharded", help="single,sharded")
    parser.add_argument("--methods", default=",".join(METHODS), help=",".join(METHODS))
    parser.add_argument("--sweep", action="store_true", help="range size x concurrency grid for liftoff instead")
    parser.add_argument("--plot", type=Path, default=BENCH_DIR / "weights.png", help="GB/s per contender (PNG)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    parser.add_argument("--tunables", help=argparse.SUPPRESS)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: nginx and proxies stop too
    if args.child:
        run_child(args)
        return 0
    args.settings = args.settings.split(",")
    args.layouts = args.layouts.split(",")
    args.methods = args.methods.split(",")
    args.dir.mkdir(parents=True, exist_ok=True)
    info = make_checkpoint(args.dir, int(args.size_gb * 1e9))
    nginx = start_nginx(args.dir / "store")
    try:
        print(f"# {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} cores; nginx on port {nginx.port}", flush=True)
        if args.sweep:
            run_sweep(args, nginx)
        else:
            rows = run_main(args, nginx, info)
            print(f"\nplot: {weights_plot(rows, args.plot)}")
    finally:
        nginx.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
