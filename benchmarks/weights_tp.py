"""Read-once tensor-parallel loading (issue 16): TP=N ranks on one node, the checkpoint read once vs N times.

    scripts/bench weights-tp                     # TP 2 and 4, shaped link, ~1.5 GB checkpoint
    .venv/bin/python benchmarks/weights_tp.py --tp 2,4 --size-gb 1.5 --settings shaped,unshaped

A synthetic Llama-like bf16 checkpoint (one file) is served by Debian's nginx with path-style URLs, through
benchmarks/shaping_proxy.py (20 ms first byte, 100 MB/s per connection, 1 GB/s total: the node's link to the
store, shared by its ranks). N processes form a gloo group (CPU: no GPU here) and load every tensor whole:

  every-rank: each rank streams the whole checkpoint (what vLLM's own loaders do: N x the bytes)
  read-once:  each rank streams ~1/N and the ranks broadcast their shares (weightstream.readonce)

Each rank touches every tensor it gets and drops it. Reported: wall time (slowest rank, from a common barrier),
bytes fetched by all ranks together and per rank, and the read-once speedup.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.shaping_proxy import SHAPED, UNSHAPED, ProxyProcess  # noqa: E402
from benchmarks.weights import BUCKET, CREDENTIALS, tensor_plan  # noqa: E402
from liftoff.devstack.services import start_nginx  # noqa: E402

DEFAULT_DIR = Path("/var/tmp/liftoff-weights-tp-bench")
KEY = "single/model.safetensors"


def make_checkpoint(directory: Path, target_bytes: int) -> dict:
    """store/bench/single/model.safetensors (random bf16 bytes), written once; returns its description."""
    marker = directory / "checkpoint.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("target_bytes") == target_bytes:
            return info
    import torch
    from safetensors.torch import save_file

    path = directory / "store" / BUCKET / KEY
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(16)
    tensors = {}
    for name, shape in tensor_plan(target_bytes):
        n = 1
        for d in shape:
            n *= d
        raw = torch.randint(0, 256, (n * 2,), dtype=torch.uint8, generator=generator)
        tensors[name] = raw.view(torch.bfloat16).reshape(shape)
    save_file(tensors, str(path), metadata={"format": "pt"})
    info = {
        "target_bytes": target_bytes,
        "bytes": sum(t.numel() * 2 for t in tensors.values()),
        "tensors": len(tensors),
        "file_bytes": path.stat().st_size,
    }
    marker.write_text(json.dumps(info))
    return info


def run_rank(args: argparse.Namespace) -> None:
    """One rank: join the gloo group, wait at a barrier, load every tensor (touching it), report."""
    import torch
    import torch.distributed as dist

    import weightstream
    from weightstream.readonce import SharedStream

    dist.init_process_group("gloo", init_method=f"file://{args.init}", rank=args.rank, world_size=args.world)
    url = f"s3://{BUCKET}/{KEY}?endpoint_url={args.endpoint}&path_style=true"
    checkpoint = weightstream.open(url)
    dist.barrier()
    started = time.perf_counter()
    stream = SharedStream(checkpoint, dist.group.WORLD) if args.mode == "read-once" else checkpoint.stream()
    count = nbytes = 0
    for _, tensor in stream:
        int(tensor.reshape(-1).view(torch.uint8)[::4096].sum()) if tensor.numel() else 0
        count += 1
        nbytes += tensor.numel() * tensor.element_size()
    seconds = time.perf_counter() - started
    dist.barrier()
    checkpoint.close()
    dist.destroy_process_group()
    stats = stream.stats
    print(
        json.dumps(
            {
                "seconds": seconds,
                "tensors": count,
                "bytes": nbytes,
                "fetched": stats.bytes_fetched,
                "received": stats.bytes_received,
            }
        )
    )


def measure(mode: str, world: int, endpoint: str, info: dict, timeout: float = 900) -> dict:
    """`world` rank processes in one group; the slowest rank's time and the bytes every rank fetched."""
    env = {**os.environ, **CREDENTIALS, "PYTHONPATH": str(ROOT)}
    env.pop("AWS_ENDPOINT_URL", None)
    with tempfile.TemporaryDirectory() as scratch:
        init = Path(scratch) / "init"
        rest = ["--init", str(init), "--endpoint", endpoint]
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--child", "--mode", mode, "--rank", str(r), "--world", str(world), *rest],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                cwd=ROOT,
            )
            for r in range(world)
        ]
        results = []
        try:
            for p in procs:
                out, err = p.communicate(timeout=timeout)
                if p.returncode != 0:
                    raise RuntimeError(f"{mode} TP={world} rank failed ({p.returncode}):\n{err[-3000:]}")
                results.append(json.loads(out.strip().splitlines()[-1]))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
    for r in results:
        if r["tensors"] != info["tensors"] or r["bytes"] != info["bytes"]:
            raise RuntimeError(f"{mode} TP={world}: a rank got {r['tensors']} tensors / {r['bytes']} bytes, expected all")
    return {
        "seconds": max(r["seconds"] for r in results),
        "fetched": sum(r["fetched"] for r in results),
        "per_rank": [r["fetched"] for r in results],
        "received": sum(r["received"] for r in results),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description="issue 16 read-once tensor-parallel benchmark")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--size-gb", type=float, default=1.5)
    parser.add_argument("--tp", default="2,4", help="tensor-parallel degrees")
    parser.add_argument("--settings", default="shaped", help="shaped,unshaped")
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell (the median is reported)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--init", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.child:
        run_rank(args)
        return 0
    args.dir.mkdir(parents=True, exist_ok=True)
    info = make_checkpoint(args.dir, int(args.size_gb * 1e9))
    nginx = start_nginx(args.dir / "store")
    rows = []
    try:
        print(
            f"# {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} cores; checkpoint {info['bytes'] / 1e9:.2f} GB, "
            f"{info['tensors']} bf16 tensors; median of {args.repeat}",
            flush=True,
        )
        for setting in args.settings.split(","):
            shaping = SHAPED if setting == "shaped" else UNSHAPED
            proxy = ProxyProcess(("127.0.0.1", nginx.port), shaping) if shaping is SHAPED else None
            endpoint = f"http://127.0.0.1:{proxy.port if proxy else nginx.port}"
            try:
                for world in [int(x) for x in args.tp.split(",")]:
                    cell = {}
                    for mode in ("every-rank", "read-once"):
                        runs = [measure(mode, world, endpoint, info) for _ in range(args.repeat)]
                        best = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
                        cell[mode] = best
                        print(
                            f"{shaping.label:>45} TP={world} {mode:<10} {best['seconds']:6.2f} s "
                            f"fetched {best['fetched'] / 1e9:5.2f} GB ({best['fetched'] / info['bytes']:.2f}x; per rank "
                            f"{', '.join(f'{b / 1e9:.2f}' for b in best['per_rank'])}) "
                            f"(all runs: {', '.join(format(r['seconds'], '.2f') for r in runs)} s)",
                            flush=True,
                        )
                    rows.append((shaping.label, world, cell))
            finally:
                if proxy:
                    proxy.stop()
    finally:
        nginx.stop()
    print()
    print("| network | TP | every rank reads: s, GB fetched | read-once: s, GB fetched | read-once x faster | bytes ratio |")
    print("|---|---|---|---|---|---|")
    for label, world, cell in rows:
        a, b = cell["every-rank"], cell["read-once"]
        print(
            f"| {label} | {world} | {a['seconds']:.2f} s, {a['fetched'] / 1e9:.2f} GB ({a['fetched'] / info['bytes']:.2f}x) | "
            f"{b['seconds']:.2f} s, {b['fetched'] / 1e9:.2f} GB ({b['fetched'] / info['bytes']:.2f}x) | "
            f"{a['seconds'] / b['seconds']:.2f}x | {b['fetched'] / a['fetched']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
