"""The store options every command that opens stores takes: --store (repeatable) and the S3 connection."""

from __future__ import annotations

import argparse


def add_store_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--store (repeatable, priority order) and the S3 connection options."""
    parser.add_argument(
        "--store",
        action="append",
        required=required,
        metavar="URL",
        help="store URL: file:///path or s3://bucket/prefix (repeat: own region first)",
    )
    parser.add_argument("--endpoint-url", help="S3 endpoint for s3:// stores (default: AWS configuration)")
    parser.add_argument("--region", help="S3 region (default: AWS configuration)")
    parser.add_argument("--path-style", action="store_true", help="path-style S3 addressing (most S3-compatible servers)")


def store_options(args: argparse.Namespace) -> dict:
    """Keyword arguments for layerstore.stores.open_store from parsed options."""
    return {"endpoint_url": args.endpoint_url, "region": args.region, "path_style": args.path_style or None}
