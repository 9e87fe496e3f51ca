"""Weights at the seeds' scale (issue 16, parts 1-2): a 7 GB checkpoint, a gp3 node disk, the AWS CLI workflow.

    scripts/bench weights-seed            # full run: 7.07 GB in 3 shards, shaped and unshaped, medians of 3
    scripts/bench weights-seed --quick    # smoke run: ~0.25 GB, 1 run each (seconds)

The seed compares its loader with "the AWS S3 CLI to download to local disk (configured to maximize
throughput) and the safetensors library to load from local disk" on nodes with gp3 EBS volumes. Here:

- checkpoint: Mistral-7B's tensor names and shapes (hidden 4096, MLP 14336, 8 KV heads of 128, vocab 32000),
  as many layers as fit --size-gb (15 for the default 7.07 GB; the whole 32-layer model is 14.5 GB, more
  than this 24 GiB machine holds twice), random bf16 bytes in 3 shards with an index, written once under
  /var/tmp (not in the repo), served by Debian's nginx with path-style S3 URLs;
- network: "shaped" = benchmarks/shaping_proxy.py at 20 ms per request + 100 MB/s per connection + 1.25 GB/s
  in total (shaping_proxy.SEED_SHAPED), and "unshaped" = nginx on loopback;
- node disk: benchmarks/gp3.py (ext4 on a loop device throttled to gp3's 125 MB/s and 3000 IOPS);
- contenders, each in its own process (peak RSS = its VmHWM; awscli's from wait4):
  (a) awscli `aws s3 cp` (its own venv under /var/tmp, max_concurrent_requests 64, multipart_chunksize 16MB)
      to the gp3 disk + sync + safetensors.torch.load_file, every tensor touched. nginx cannot list a bucket,
      so `cp --recursive` is one `cp` per object (the shards in turn): 64 requests of 16 MB fill the link
      within one 2.4 GB shard, and the disk, not the link, bounds the download;
  (b) boto3 download_file to the gp3 disk + sync + load_file;
  (c) Run:ai Model Streamer, tuned; (d) weightstream.load and weightstream streaming (bounded memory);
  (e) raw parallel ranged GETs into one reused, cache-hot buffer (the network's limit), and (e') the same GETs
      into new memory of the checkpoint's size, allocated and populated as weightstream's host sink does (the
      limit for any loader that must produce the checkpoint in fresh memory on this machine).
  The disk workflows are timed twice from one download: load_file with the page cache kept after the download
  (a node with RAM to spare), and after `sync; echo 3 > /proc/sys/vm/drop_caches` (a node without).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import weights  # noqa: E402
from benchmarks.benchlib import drop_caches, load_average, machine, timed  # noqa: E402
from benchmarks.gp3 import Gp3Disk  # noqa: E402
from benchmarks.shaping_proxy import SEED_SHAPED, UNSHAPED, ProxyProcess  # noqa: E402
from benchmarks.weights import BUCKET, CREDENTIALS, MiB  # noqa: E402
from liftoff.devstack.services import start_nginx  # noqa: E402

DEFAULT_DIR = Path("/var/tmp/liftoff-weights-seed")
QUICK_DIR = Path("/var/tmp/liftoff-weights-seed-quick")
AWSCLI_VENV = Path("/var/tmp/liftoff-awscli")
LAYOUT = "sharded"  # weights.py's children read store/bench/sharded/ (the index and its shards)
SHARDS = 3
RAW = {"concurrency": 16, "range_size": 16 * MiB}
NETWORK = ["runai-tuned", "liftoff", "liftoff-stream", "raw", "raw-fresh"]
DISK = ["awscli", "boto3"]
LABELS = {
    "awscli": "(a) awscli s3 cp + sync + load_file (gp3)",
    "boto3": "(b) boto3 download_file + sync + load_file (gp3)",
    "runai-tuned": "(c) Run:ai streamer, tuned",
    "liftoff": "(d) liftoff weightstream.load",
    "liftoff-stream": "(d) liftoff streaming (bounded memory)",
    "raw": "(e) raw parallel GETs (limit)",
    "raw-fresh": "(e') raw GETs into fresh memory (limit for a loader)",
}


# -- the checkpoint ----------------------------------------------------------------------------------------
def mistral_plan(target_bytes: int, hidden: int = 4096, inter: int = 14336, vocab: int = 32000, kv_heads: int = 8):
    """Mistral-7B's tensor names and shapes (head dim hidden/32), with as many layers as fit `target_bytes`."""
    kv = kv_heads * hidden // 32
    per_layer = (2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * inter + 2 * hidden) * 2
    fixed = (2 * vocab * hidden + hidden) * 2
    layers = max(1, round((target_bytes - fixed) / per_layer))
    plan: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        plan += [(p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.k_proj.weight", (kv, hidden))]
        plan += [(p + "self_attn.v_proj.weight", (kv, hidden)), (p + "self_attn.o_proj.weight", (hidden, hidden))]
        plan += [(p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden))]
        plan += [(p + "mlp.down_proj.weight", (hidden, inter))]
        plan += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    plan += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return plan, layers


def _write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], rng, probes: dict[str, str]) -> int:
    """A safetensors file of random bf16 bytes, written in 64 MiB blocks; returns its data bytes."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, _ in tensors:
            begin, end = header[name]["data_offsets"]
            first = last = b""
            left = end - begin
            while left:
                block = rng.bytes(min(left, 64 * MiB))
                first = first or block[:64]
                last = (last + block)[-64:]
                f.write(block)
                left -= len(block)
            if len(probes) < 4:
                probes[name] = (first + last).hex()
    return offset


def make_checkpoint(directory: Path, target_bytes: int, quick: bool) -> dict:
    """store/bench/sharded/model-0000N-of-00003.safetensors + index, once; returns weights.py's description."""
    marker = directory / "checkpoint.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("target_bytes") == target_bytes:
            return info
    import numpy

    dims = {"hidden": 1024, "inter": 3584} if quick else {}
    plan, layers = mistral_plan(target_bytes, **dims)
    store = directory / "store" / BUCKET / LAYOUT
    store.mkdir(parents=True, exist_ok=True)
    for old in store.iterdir():
        old.unlink()
    sizes = [(2 * _numel(shape), name, shape) for name, shape in plan]
    share = sum(s for s, _, _ in sizes) / SHARDS
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    filled = 0
    for size, name, shape in sizes:  # in file order, as a trainer's save_pretrained splits
        if filled >= share * len(groups) and len(groups) < SHARDS:
            groups.append([])
        groups[-1].append((name, shape))
        filled += size
    rng = numpy.random.default_rng(16)
    probes: dict[str, str] = {}
    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        total += _write_shard(store / file, group, rng, probes)
        weight_map.update({name: file for name, _ in group})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (store / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    info = {
        "target_bytes": target_bytes,
        "bytes": total,
        "tensors": len(plan),
        "layers": layers,
        LAYOUT: [f"{LAYOUT}/{f}" for f in sorted(set(weight_map.values()))],
        "probe": probes,
    }
    marker.write_text(json.dumps(info, indent=1))
    return info


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# -- the disk workflows (children) -----------------------------------------------------------------------------
def awscli_config(directory: Path) -> Path:
    """The CLI configured for throughput (64 requests in flight, 16 MB parts), path-style addressing."""
    path = directory / "awscli.config"
    path.write_text(
        "[default]\nregion = us-east-1\ns3 =\n  max_concurrent_requests = 64\n  max_queue_size = 10000\n"
        "  multipart_threshold = 16MB\n  multipart_chunksize = 16MB\n  addressing_style = path\n"
    )
    return path


def ensure_awscli() -> Path:
    """awscli in its own virtualenv under /var/tmp (its botocore pin would fight the project's boto3)."""
    aws = AWSCLI_VENV / "bin" / "aws"
    if not aws.exists():
        subprocess.run([sys.executable, "-m", "venv", str(AWSCLI_VENV)], check=True)
        subprocess.run([str(AWSCLI_VENV / "bin" / "pip"), "install", "-q", "awscli"], check=True)
    return aws


def _load_and_check(paths: list[Path], info: dict) -> int:
    from safetensors.torch import load_file

    state: dict = {}
    for path in paths:
        state.update(load_file(str(path)))
    nbytes = weights._check(state, info)  # every page touched, count/bytes/probes checked
    weights.RESULTS.clear()  # the disk workflows load twice: the first result goes before the second load
    del state
    return nbytes


def child_disk(method: str, endpoint: str, info: dict, directory: Path, mountpoint: Path) -> dict:
    """Download to the gp3 disk, sync, load_file (cache kept); drop caches, load_file again (cache dropped)."""
    target = mountpoint / "model"
    target.mkdir(parents=True, exist_ok=True)
    aws_rss = 0.0
    started = time.perf_counter()
    if method == "awscli":
        env = {**os.environ, "AWS_CONFIG_FILE": str(awscli_config(directory))}
        argv = [str(ensure_awscli()), "s3", "cp", "--endpoint-url", endpoint, "--only-show-errors"]
        for key in info[LAYOUT] + [f"{LAYOUT}/model.safetensors.index.json"]:  # nginx cannot list: no --recursive
            aws_rss = max(aws_rss, timed([*argv, f"s3://{BUCKET}/{key}", str(target / Path(key).name)], env=env).peak_rss_mb)
    else:
        import boto3
        import botocore.config

        config = botocore.config.Config(s3={"addressing_style": "path"})
        client = boto3.client("s3", endpoint_url=endpoint, config=config)
        for key in info[LAYOUT] + [f"{LAYOUT}/model.safetensors.index.json"]:
            client.download_file(BUCKET, key, str(target / Path(key).name))
    downloaded = time.perf_counter()
    subprocess.run(["sync"], check=True)
    synced = time.perf_counter()
    paths = [target / Path(key).name for key in info[LAYOUT]]
    nbytes = _load_and_check(paths, info)
    kept = time.perf_counter() - synced
    drop_caches(keep_warm=(directory / "store",))  # untimed; the store is warm again for the next contender
    loaded = time.perf_counter()
    _load_and_check(paths, info)
    dropped = time.perf_counter() - loaded
    for path in target.iterdir():
        path.unlink()
    return {
        "download_s": downloaded - started,
        "sync_s": synced - downloaded,
        "load_kept_s": kept,
        "load_dropped_s": dropped,
        "bytes": nbytes,
        "peak_rss_mb": max(weights._peak_rss_mb(), aws_rss),
    }


def measure_disk(method: str, endpoint: str, directory: Path, mountpoint: Path) -> dict:
    argv = [sys.executable, __file__, "--child", method, "--endpoint", endpoint, "--dir", str(directory)]
    env = {**os.environ, **CREDENTIALS, "PYTHONPATH": str(ROOT)}
    env.pop("AWS_ENDPOINT_URL", None)
    done = subprocess.run([*argv, "--mountpoint", str(mountpoint)], capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    head = result["download_s"] + result["sync_s"]
    result["kept"] = head + result["load_kept_s"]
    result["dropped"] = head + result["load_dropped_s"]
    return result


# -- the run -----------------------------------------------------------------------------------------------------
def _median(runs: list[dict], key: str) -> tuple[float, float, float]:
    values = [r[key] for r in runs]
    return statistics.median(values), min(values), max(values)


def _fmt(stat: tuple[float, float, float]) -> str:
    mid, low, high = stat
    return f"{mid:.1f} ({low:.1f}-{high:.1f})" if high > low else f"{mid:.1f}"


def run(args: argparse.Namespace, info: dict) -> None:
    store = args.dir / "store"
    nginx = start_nginx(store)
    results: dict[tuple[str, str], list[dict]] = {}
    try:
        need_disk = any(m in DISK for m in args.methods) and any(s in args.disk_settings for s in args.settings)
        size_gb = max(4, int(info["bytes"] * 2 / 2**30) + 2)
        with Gp3Disk(args.dir / "gp3", size_gb=size_gb) if need_disk else nullcontext() as disk:
            print(f"# {time.strftime('%Y-%m-%d %H:%M')} {machine()}; load {load_average():.2f}", flush=True)
            if disk is not None:
                print(f"# node disk: {disk.describe()}; dd: {disk.check(256 if args.quick else 1024)}", flush=True)
            for setting in args.settings:
                shaping = SEED_SHAPED if setting == "shaped" else UNSHAPED
                proxy = ProxyProcess(("127.0.0.1", nginx.port), shaping) if shaping is not UNSHAPED else None
                endpoint = f"http://127.0.0.1:{proxy.port if proxy else nginx.port}"
                try:
                    for method in args.methods:
                        if method in DISK and setting not in args.disk_settings:
                            continue
                        runs = []
                        for _ in range(args.repeat):
                            drop_caches(keep_warm=(store,))  # a fresh node each run; the store stays warm
                            if method in DISK:
                                runs.append(measure_disk(method, endpoint, args.dir, disk.mountpoint))
                            else:
                                r = weights.measure(method, endpoint, LAYOUT, args.dir, RAW if method.startswith("raw") else None)
                                runs.append({**r, "kept": r["seconds"], "dropped": r["seconds"]})
                            print(f"{shaping.label:>48}  {LABELS[method]:<50} {json.dumps(runs[-1])}", flush=True)
                        results[(setting, method)] = runs
                finally:
                    if proxy:
                        proxy.stop()
    finally:
        nginx.stop()
    report(args, info, results)


def report(args: argparse.Namespace, info: dict, results: dict[tuple[str, str], list[dict]]) -> None:
    gb = info["bytes"] / 1e9
    print(
        f"\nCheckpoint: {gb:.2f} GB, {info['tensors']} bf16 tensors (Mistral-7B shapes, {info['layers']} layers), "
        f"{SHARDS} shards; median of {args.repeat} (min-max); load {load_average():.2f}.\n"
    )
    print("| network | contender | seconds (page cache kept) | seconds (dropped) | GB/s | peak RSS (MB) | liftoff vs it |")
    print("|---|---|---|---|---|---|---|")
    for (setting, method), runs in results.items():
        kept, dropped = _median(runs, "kept"), _median(runs, "dropped")
        rss = statistics.median(r["peak_rss_mb"] for r in runs)
        mine = results.get((setting, "liftoff"))
        ratio = ""
        if mine and method != "liftoff":
            lo = _median(mine, "kept")[0]
            if method.startswith("raw"):
                ratio = f"liftoff = {kept[0] / lo:.0%} of it"
            elif method in DISK:
                ratio = f"{kept[0] / lo:.2f}x / {dropped[0] / lo:.2f}x"
            else:
                ratio = f"{kept[0] / lo:.2f}x"
        drop_col = _fmt(dropped) if method in DISK else "same"
        print(
            f"| {SEED_SHAPED.label if setting == 'shaped' else 'unshaped'} | {LABELS[method]} | {_fmt(kept)} | "
            f"{drop_col} | {gb / kept[0]:.2f} | {rss:.0f} | {ratio} |"
        )
    for (setting, method), runs in results.items():
        if method in DISK:
            keys = ("download_s", "sync_s", "load_kept_s", "load_dropped_s")
            phases = ", ".join(f"{k[:-2]} {_median(runs, k)[0]:.1f} s" for k in keys)
            print(f"\n{setting} {method} phases (medians): {phases}")


def run_child(args: argparse.Namespace) -> None:
    import torch  # noqa: F401 - imported before the clock starts, as in benchmarks/weights.py

    info = json.loads((args.dir / "checkpoint.json").read_text())
    print(json.dumps(child_disk(args.child, args.endpoint, info, args.dir, Path(args.mountpoint))))


def main() -> int:
    parser = argparse.ArgumentParser(description="issue 16 weights benchmark at the seeds' scale")
    parser.add_argument("--quick", action="store_true", help="smoke run: ~0.25 GB checkpoint, 1 run each")
    parser.add_argument("--dir", type=Path, help=f"checkpoint, store and disk image (default {DEFAULT_DIR})")
    parser.add_argument("--size-gb", type=float, help="checkpoint size (default 7.07; --quick 0.25)")
    parser.add_argument("--repeat", type=int, help="runs per contender (default 3; --quick 1)")
    parser.add_argument("--settings", default="shaped,unshaped", help="shaped,unshaped")
    parser.add_argument("--disk-settings", default="shaped", help="settings the disk workflows run in (shaped,unshaped)")
    parser.add_argument("--methods", default=",".join(DISK + NETWORK), help=",".join(DISK + NETWORK))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--mountpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dir = args.dir or (QUICK_DIR if args.quick else DEFAULT_DIR)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: disk, nginx, proxy go too
    if args.child:
        run_child(args)
        return 0
    args.size_gb = args.size_gb or (0.25 if args.quick else 7.07)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.settings = args.settings.split(",")
    args.disk_settings = args.disk_settings.split(",")
    args.methods = args.methods.split(",")
    if "awscli" in args.methods:
        ensure_awscli()
    args.dir.mkdir(parents=True, exist_ok=True)
    info = make_checkpoint(args.dir, int(args.size_gb * 1e9), args.quick)
    run(args, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
