"""`liftoff weights ...`: load a checkpoint (to check it and time it) and benchmark range settings."""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys

from layerstore.units import format_size, size_arg
from weightstream.options import DEFAULT_CONCURRENCY, DEFAULT_POOL_BYTES, DEFAULT_RANGE_SIZE, MIN_RANGE_SIZE


def _add_source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="s3://bucket/prefix/ (model.safetensors or a sharded index), file:///path or a path")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: the AWS configuration)")
    p.add_argument("--region", help="S3 region (default: the AWS configuration)")
    p.add_argument("--path-style", action="store_true", help="path-style S3 addressing (most S3-compatible servers)")
    p.add_argument(
        "--range-size",
        type=size_arg(MIN_RANGE_SIZE),
        help=f"bytes per ranged GET (default {format_size(DEFAULT_RANGE_SIZE)})",
    )
    p.add_argument("--concurrency", type=int, help=f"parallel connections (default {DEFAULT_CONCURRENCY})")
    p.add_argument(
        "--pool",
        type=size_arg(MIN_RANGE_SIZE),
        dest="pool_bytes",
        help=f"memory held ahead of the consumer (default {format_size(DEFAULT_POOL_BYTES)})",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        metavar="SECONDS",
        help="seconds without a byte before a request is abandoned and retried; three in a row fail (default 20)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def register(subparsers) -> None:
    weights = subparsers.add_parser("weights", help="stream safetensors checkpoints from S3 into CPU/GPU memory")
    sub = weights.add_subparsers(dest="weights_command", required=True, metavar="COMMAND")

    p = sub.add_parser("load", help="load a checkpoint into memory (validates it; reports speed)")
    _add_source_options(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda:N (default cpu)")
    p.add_argument("--dtype", help="convert floating-point tensors (e.g. bfloat16, float16, float32)")
    p.add_argument("--filter", help="only tensors whose names match this glob")
    p.add_argument("--sha256", help="manifest to verify against: a name in the checkpoint's prefix or an absolute path")
    p.set_defaults(run=run_load)

    p = sub.add_parser("bench", help="time streaming the checkpoint (discarding tensors) at several settings")
    _add_source_options(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda:N (default cpu)")
    p.add_argument("--repeat", type=int, default=3, help="runs per setting (the median is reported)")
    p.add_argument("--sweep", action="store_true", help="try range sizes 4-64MiB x concurrency 4-32")
    p.set_defaults(run=run_bench)

    p = sub.add_parser("config", help="copy a checkpoint's non-weight files (config.json, tokenizer) to a local dir for vLLM")
    p.add_argument("url", help="s3://bucket/prefix/ or a local directory")
    p.add_argument("dest", help="local directory to write (vllm serve DEST --load-format liftoff ...)")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: the AWS configuration)")
    p.add_argument("--region", help="S3 region (default: the AWS configuration)")
    p.add_argument("--path-style", action="store_true", help="path-style S3 addressing")
    p.set_defaults(run=run_config)


def _open(args: argparse.Namespace, **overrides: object):
    import weightstream

    tunables = {k: getattr(args, k) for k in ("range_size", "concurrency", "pool_bytes", "stall_timeout")}
    tunables.update(overrides)
    return weightstream.open(
        args.url,
        endpoint_url=args.endpoint_url,
        region=args.region,
        path_style=args.path_style or None,
        sha256=getattr(args, "sha256", None),
        **{k: v for k, v in tunables.items() if v is not None},
    )


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_load(args: argparse.Namespace) -> int:
    import torch

    from layerstore.progress import ProgressLine
    from weightstream.api import name_filter
    from weightstream.errors import WeightsError

    dtype = None
    if args.dtype:
        dtype = getattr(torch, args.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise WeightsError(f"unknown dtype {args.dtype!r}: use a torch dtype name (bfloat16, float16, float32)")
    with _open(args) as checkpoint:
        keep = name_filter(args.filter)
        total = sum(t.nbytes for t in checkpoint.tensors.values() if keep(t.name))
        stream = checkpoint.stream(device=args.device, dtype=dtype, filter=args.filter, hold_all=True)
        with ProgressLine(total, f"load {checkpoint.url}", enabled=False if args.json else None) as line:

            def fetched() -> int:  # bytes in memory, of the tensors' bytes
                return min(stream.stats.bytes_fetched, total)

            line.follow(fetched)  # also while a file's tensors wait for its sha256
            state = {}
            for name, tensor in stream:
                state[name] = tensor
                line.set(fetched())
            line.close(total)
        stats = stream.stats
        summary = {
            "url": checkpoint.url,
            "files": len(checkpoint.files),
            "tensors": len(state),
            "bytes": stats.bytes_delivered,
            "seconds": round(stats.seconds, 3),
            "gbps": round(stats.gbps, 3),
            "ranges": stats.ranges,
            "retries": stats.retries,
            "device": args.device,
            "verified": bool(checkpoint.manifest),
            "peak_rss_mb": round(_peak_rss_mb()),
        }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"{summary['url']}: {summary['tensors']} tensors in {summary['files']} file(s), {summary['bytes'] / 1e9:.2f} GB "
            f"to {args.device} in {summary['seconds']:.2f}s ({summary['gbps']:.2f} GB/s, {summary['ranges']} ranges, "
            f"{summary['retries']} retries{', sha256 verified' if summary['verified'] else ''}); "
            f"peak RSS {summary['peak_rss_mb']} MB"
        )
    return 0


def _time(args: argparse.Namespace, **settings: int) -> tuple[float, int]:
    rates = []
    retries = 0
    with _open(args, **settings) as checkpoint:
        for _ in range(args.repeat):
            stream = checkpoint.stream(device=args.device)
            for _name, _tensor in stream:
                pass
            rates.append(stream.stats.gbps)
            retries += stream.stats.retries
    return statistics.median(rates), retries


def run_bench(args: argparse.Namespace) -> int:
    if args.sweep:
        grid = [(r << 20, c) for r in (4, 8, 16, 32, 64) for c in (4, 8, 16, 32)]
    else:
        grid = [(args.range_size or DEFAULT_RANGE_SIZE, args.concurrency or DEFAULT_CONCURRENCY)]
    rows = []
    for range_size, concurrency in grid:
        pool = max(args.pool_bytes or DEFAULT_POOL_BYTES, range_size * concurrency)
        gbps, retries = _time(args, range_size=range_size, concurrency=concurrency, pool_bytes=pool)
        rows.append({"range_size": range_size, "concurrency": concurrency, "gbps": round(gbps, 3), "retries": retries})
        if not args.json:
            print(
                f"range {format_size(range_size):>7}  x {concurrency:>2} connections: {gbps:6.2f} GB/s  ({retries} retries)",
                flush=True,
            )
    best = max(rows, key=lambda r: r["gbps"])
    if args.json:
        print(json.dumps({"url": args.url, "runs": rows, "best": best, "peak_rss_mb": round(_peak_rss_mb())}))
    else:
        print(
            f"best: {format_size(best['range_size'])} x {best['concurrency']} at {best['gbps']:.2f} GB/s; "
            f"peak RSS {_peak_rss_mb():.0f} MB"
        )
    return 0


def run_config(args: argparse.Namespace) -> int:
    from weightstream.vllm_plugin import fetch_config_dir

    names = fetch_config_dir(
        args.url, args.dest, endpoint_url=args.endpoint_url, region=args.region, path_style=args.path_style or None
    )
    print(f"{len(names)} file(s) to {args.dest}: {', '.join(names)}")
    print(f"vllm serve {args.dest} --load-format liftoff --model-loader-extra-config '{json.dumps({'url': args.url})}'")
    return 0


if __name__ == "__main__":
    sys.exit("run through `liftoff weights ...`")
