#!/usr/bin/env python3
"""CPU per whole-object S3 GET: botocore's get_object against a presigned URL on a kept-alive connection.

    scripts/bench s3get [--runs 5] [--requests 400] [--size 400000]

The chunk path's S3 reads (layerstore/stores/presigned.py) are measured against what they replace, in one run:
one thread, `S3Store.get` of one object (a chunk's typical stored size) from Debian's nginx on loopback, the CPU
seconds of this process per request (`time.process_time`), the two paths alternated; medians of `--runs`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.benchlib import load_average, machine
from layerstore import s3url
from layerstore.stores.s3 import S3Store
from liftoff.devstack.services import start_nginx


class _BotocoreOnly:
    """Stands in for the presigned getter: the store then reads through get_object."""

    usable = False

    def close(self) -> None:
        pass


def cpu_per_get(store: S3Store, requests: int) -> float:
    store.get("obj")  # connection and signer warm
    started = time.process_time()
    for _ in range(requests):
        store.get("obj")
    return (time.process_time() - started) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--size", type=int, default=400_000, help="the object's bytes")
    args = parser.parse_args()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    with tempfile.TemporaryDirectory(prefix="liftoff-s3get-") as root:
        (Path(root) / "bench").mkdir()
        (Path(root) / "bench" / "obj").write_bytes(os.urandom(args.size))
        nginx = start_nginx(root, workers=1)
        try:
            location = s3url.parse(f"s3://bench/?endpoint_url=http://127.0.0.1:{nginx.port}&path_style=true")
            seconds: dict[str, list[float]] = {"botocore get_object": [], "presigned URL + http.client": []}
            for _ in range(args.runs):
                for name in seconds:
                    store = S3Store(location, attempts=1)
                    if name.startswith("botocore"):
                        store._getter = _BotocoreOnly()
                    seconds[name].append(cpu_per_get(store, args.requests))
                    store.close()
        finally:
            nginx.stop()
    for name, values in seconds.items():
        print(
            f"{name}: {statistics.median(values) * 1e3:.3f} ms CPU per GET of {args.size / 1e3:.0f} kB "
            f"(min {min(values) * 1e3:.3f}, max {max(values) * 1e3:.3f})"
        )
    ratio = statistics.median(seconds["botocore get_object"]) / statistics.median(seconds["presigned URL + http.client"])
    print(f"presigned: {ratio:.2f}x less CPU per GET than botocore")
    print(f"machine: {machine()}; load average {load_average():.1f}")


if __name__ == "__main__":
    main()
