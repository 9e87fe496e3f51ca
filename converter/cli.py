"""Subcommands of the image store: convert, replicate, ls, inspect, verify, rm, gc."""

from __future__ import annotations

import argparse
import json
import sys

from layerstore.chunker import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from layerstore.leases import DEFAULT_TTL
from layerstore.stores.options import add_store_options, store_options
from layerstore.units import size_arg


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert an OCI image into the chunked store format")
    p.add_argument("source", help="registry reference (host[:port]/repo:tag or @sha256:...) or oci:DIR[:TAG]")
    add_store_options(p)
    p.add_argument("--plain-http", action="store_true", help="talk HTTP, not HTTPS, to the registry")
    p.add_argument("--docker-config", help="docker config file with credentials (default ~/.docker/config.json)")
    p.add_argument("--platform", action="append", help="os/arch[/variant] to convert from an index (default: all)")
    p.add_argument(
        "--chunk-size",
        type=size_arg(MIN_CHUNK_SIZE, MAX_CHUNK_SIZE),
        default=DEFAULT_CHUNK_SIZE,
        help="chunk size, 4K to 64M (default 1MiB)",
    )
    p.add_argument("--workers", type=int, help="chunk compress/upload threads (default: cores, or 16 for s3 stores)")
    p.add_argument("--layer-jobs", type=int, help="layers converted at once (default: half the cores, at least 1)")
    p.add_argument("--zstd-level", type=int, default=3, help="zstd level for chunks (default 3)")
    p.add_argument(
        "--fetch-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="the longest one manifest or blob download may take (default: 10 min plus its size at 256 KiB/s)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON summary object")
    p.set_defaults(run=run_convert)

    p = subparsers.add_parser("replicate", help="copy converted images to another region's store")
    p.add_argument("images", nargs="*", help="image digests or references (default with --all: every image)")
    p.add_argument("--from", dest="from_url", required=True, metavar="URL", help="source store URL")
    p.add_argument("--to", dest="to_url", required=True, metavar="URL", help="target store URL")
    p.add_argument("--all", action="store_true", help="replicate every image in the source store")
    p.add_argument("--endpoint-url", help="S3 endpoint for both stores (or per URL: ?endpoint_url=)")
    p.add_argument("--region", help="S3 region")
    p.add_argument("--path-style", action="store_true", help="path-style S3 addressing")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(run=run_replicate)

    p = subparsers.add_parser("ls", help="list the images in a store")
    add_store_options(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run_ls)

    p = subparsers.add_parser("inspect", help="show an image's layers, files, sizes and deduplication")
    p.add_argument("image", help="manifest digest or the reference it was converted from")
    add_store_options(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run_inspect)

    p = subparsers.add_parser("verify", help="check an image's chunks and indexes (and against its source)")
    p.add_argument("image", help="manifest digest or the reference it was converted from")
    add_store_options(p)
    p.add_argument("--source", help="also compare every entry with this source image (reference or oci:DIR[:TAG])")
    p.add_argument("--plain-http", action="store_true", help="talk HTTP to the source registry")
    p.add_argument("--docker-config", help="docker config file with credentials")
    p.add_argument("--json", action="store_true", help="print one JSON object (problems: an error object, exit 4)")
    p.set_defaults(run=run_verify)

    p = subparsers.add_parser("rm", help="remove an image from the stores (liftoff gc then frees its chunks)")
    p.add_argument("image", help="manifest digest or the reference it was converted from")
    add_store_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run_rm)

    p = subparsers.add_parser("gc", help="delete the chunks, indexes and records that no image references")
    add_store_options(p)
    p.add_argument("--dry-run", action="store_true", help="report what would be deleted, delete nothing")
    p.add_argument(
        "--lease-ttl",
        type=float,
        default=DEFAULT_TTL,
        metavar="S",
        help=f"seconds after which a silent writer's lease counts as dead (default {DEFAULT_TTL:.0f})",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per store")
    p.set_defaults(run=run_gc)


def run_convert(args: argparse.Namespace) -> int:
    from converter.image import ConvertOptions, convert_image
    from converter.progress import Progress
    from layerstore.oci.source import open_source
    from layerstore.stores import open_stores

    stores = open_stores(args.store, **store_options(args))
    source = open_source(
        args.source, plain_http=args.plain_http, docker_config=args.docker_config, fetch_timeout=args.fetch_timeout
    )
    options = ConvertOptions(
        chunk_size=args.chunk_size,
        platforms=args.platform,
        workers=max(1, args.workers) if args.workers else None,
        layer_jobs=max(1, args.layer_jobs) if args.layer_jobs else ConvertOptions.layer_jobs,
        zstd_level=args.zstd_level,
        fetch_timeout=args.fetch_timeout,
        progress=Progress(enabled=None if not args.json else False),
    )
    try:
        result = convert_image(source, stores, options)
    finally:
        source.close()
        for store in stores:
            store.close()
    summary = result.summary()
    if args.json:
        json.dump(summary, sys.stdout)
        sys.stdout.write("\n")
    else:
        _print_summary(summary)
    return 0


def _print_summary(s: dict) -> None:
    for image in s["images"]:
        platform = "/".join(v for v in image["platform"].values()) or "-"
        print(f"{image['manifest_digest']}  {platform}")
        for layer in image["layers"]:
            state = "already converted" if layer["already_converted"] else f"{layer['chunks_new']} new chunks"
            print(
                f"  {layer['digest'][:19]}  {layer['bytes_in'] / 1e6:9.1f} MB  {layer['files']:7d} files  "
                f"{layer['chunks']:6d} chunks  {state}"
            )
    rate = s["bytes_in"] / s["seconds"] / 1e6 if s["seconds"] else 0
    print(
        f"{s['image']}: {s['bytes_in'] / 1e6:.1f} MB, {s['files']} files, {s['chunks_total']} chunks "
        f"({s['chunks_new']} new, {s['bytes_uploaded'] / 1e6:.1f} MB uploaded, {s['dedupe_ratio']:.0%} deduplicated) "
        f"in {s['seconds']:.2f} s ({rate:.0f} MB/s)"
    )


def _chain(args: argparse.Namespace):
    from layerstore.stores import StoreChain, open_stores

    return StoreChain(open_stores(args.store, **store_options(args)))


def run_replicate(args: argparse.Namespace) -> int:
    from converter.replicate import replicate
    from layerstore.errors import LiftoffError
    from layerstore.stores import open_store

    if bool(args.images) == bool(args.all):
        raise LiftoffError("name the images to replicate, or pass --all")
    options = store_options(args)
    source, target = open_store(args.from_url, **options), open_store(args.to_url, **options)
    stats = replicate(source, target, args.images or None, progress=False if args.json else None)
    if args.json:
        print(json.dumps(stats.__dict__))
    else:
        print(
            f"{stats.images} image(s): {stats.layers_copied} layers copied ({stats.layers_present} present), "
            f"{stats.chunks_copied} chunks copied ({stats.chunks_present} present), {stats.bytes_copied / 1e6:.1f} MB moved"
        )
    return 0


def run_ls(args: argparse.Namespace) -> int:
    from converter.inspect import list_images

    rows = list_images(_chain(args))
    if args.json:
        print(json.dumps(rows))
        return 0
    for row in rows:
        refs = ", ".join(row["references"]) or "-"
        if row["kind"] == "index":
            print(f"{row['digest']}  index  {','.join(row['platforms'])}  {refs}")
        else:
            profile = "profile" if row["profile"] else "-"
            print(
                f"{row['digest']}  {row['platforms'][0]}  {row['layers']} layers  {row['tar_bytes'] / 1e6:.1f} MB  "
                f"{row['files']} files  {profile}  {refs}"
            )
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from converter.inspect import inspect_image

    info = inspect_image(_chain(args), args.image)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{info['digest']}  {', '.join(info['references']) or '-'}")
    for image in info["images"]:
        print(f"  {image['manifest_digest']}  {image['platform']}  converted {image['converted_at']} by {image['converter']}")
        print(
            f"  {'layer':19}  {'entries':>8} {'files':>7} {'dirs':>6} {'links':>6} {'wh':>4} {'MB':>9} "
            f"{'chunks':>7} {'stored MB':>9}"
        )
        for layer in image["layers"]:
            print(
                f"  {layer['digest'][:19]}  {layer['entries']:8d} {layer['files']:7d} {layer['dirs']:6d} {layer['symlinks']:6d} "
                f"{layer['whiteouts']:4d} {layer['file_bytes'] / 1e6:9.1f} {layer['chunks']:7d} "
                f"{layer['stored_bytes'] / 1e6:9.1f}"
            )
        ratio = image["compression_ratio"]
        print(
            f"  {image['tar_bytes'] / 1e6:.1f} MB of tar in {image['stored_bytes'] / 1e6:.1f} MB of unique chunks"
            f"{f' ({ratio}x)' if ratio else ''}; {image['chunks_shared_between_layers'] / 1e6:.1f} MB shared between layers;"
            f" profile: {image['profile_chunks']} chunks"
        )
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from converter.verify import verify_image
    from layerstore.errors import VerificationFailed
    from layerstore.oci.source import open_source

    source = open_source(args.source, plain_http=args.plain_http, docker_config=args.docker_config) if args.source else None
    try:
        problems = verify_image(_chain(args), args.image, source, report=(lambda _line: None) if args.json else print)
    finally:
        if source is not None:
            source.close()
    if problems:
        if not args.json:
            for problem in problems:
                print(problem, file=sys.stderr)
        error = VerificationFailed(f"verify found {len(problems)} problem(s) in {args.image}")
        error.details = {"image": args.image, "problems": problems}  # type: ignore[attr-defined]
        raise error
    print(json.dumps({"image": args.image, "verified": True, "problems": []}) if args.json else "verified")
    return 0


def run_rm(args: argparse.Namespace) -> int:
    from layerstore.garbage import remove_image
    from layerstore.stores import open_stores

    stores = open_stores(args.store, **store_options(args))
    removed = remove_image(stores, args.image)
    if args.json:
        print(json.dumps({"image": args.image, "removed": removed, "stores": [s.url for s in stores]}))
        return 0
    print(f"removed {', '.join(removed)} from {', '.join(s.url for s in stores)}")
    print("its chunks stay until `liftoff gc` runs on each store (nodes still running the image keep working until then)")
    return 0


def run_gc(args: argparse.Namespace) -> int:
    from layerstore.garbage import collect_garbage
    from layerstore.stores import open_stores

    for store in open_stores(args.store, **store_options(args)):
        report = collect_garbage(store, dry_run=args.dry_run, ttl=args.lease_ttl)
        if args.json:
            print(json.dumps(report.to_dict()))
            continue
        verb = "would delete" if report.dry_run else "deleted"
        removed = ", ".join(f"{n} {kind}" for kind, n in report.removed.items())
        print(
            f"{report.store}: {report.images} image records keep {report.live_objects} objects "
            f"({report.kept_bytes / 1e6:.1f} MB); {verb} {removed} ({report.removed_bytes / 1e6:.1f} MB), "
            f"{report.expired_leases} expired leases, {report.temp_files} temp files in {report.seconds:.1f} s"
        )
    return 0
