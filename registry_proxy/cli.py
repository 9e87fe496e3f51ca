"""`liftoff proxy`: run the pull-through, caching, converting registry mirror, or print containerd's hosts.toml for it."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from layerstore.stores.options import add_store_options, store_options
from layerstore.units import format_size, size_arg
from registry_proxy.config import DEFAULT_CACHE_DIR, DEFAULT_CACHE_SIZE, DEFAULT_LISTEN, MAX_MANIFEST_BYTES


def _upstream_options(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "--upstream",
        action="append",
        required=required,
        metavar="NAME=URL",
        help="an upstream registry: NAME as images name it, URL where it is (repeat), e.g. docker.io=https://registry-1.docker.io",
    )
    p.add_argument(
        "--plain-http",
        action="append",
        default=[],
        metavar="NAME",
        help="allow plain HTTP to upstream NAME (loopback registries)",
    )


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "proxy",
        allow_abbrev=False,
        help="run the registry mirror that pulls through, caches, and converts images on first pull",
        description="Serve the OCI distribution API (read-only) as a mirror for containerd: blobs and manifests are fetched "
        "from the configured upstreams once, verified and cached on disk; the first pull of an image queues its conversion "
        "into the --store(s), so the next pull runs lazily. `liftoff proxy config` prints containerd's hosts.toml.",
    )
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="ADDR", help=f"HOST:PORT to serve on (default {DEFAULT_LISTEN})")
    _upstream_options(p, required=False)
    p.add_argument(
        "--pass-credentials", action="append", default=[], metavar="NAME", help="forward clients' credentials to upstream NAME"
    )
    p.add_argument(
        "--default-upstream", metavar="NAME", help="upstream for requests without containerd's ?ns= (default: the first)"
    )
    p.add_argument("--docker-config", metavar="FILE", help="the proxy's upstream credentials (default ~/.docker/config.json)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help=f"blob cache and state (default {DEFAULT_CACHE_DIR})")
    p.add_argument(
        "--cache-size",
        type=size_arg(1),
        default=DEFAULT_CACHE_SIZE,
        help=f"blob cache cap, LRU beyond it (default {DEFAULT_CACHE_SIZE})",
    )
    p.add_argument(
        "--tag-ttl", type=float, default=60.0, metavar="SECONDS", help="revalidate tags upstream after this long (default 60)"
    )
    p.add_argument(
        "--fetch-timeout",
        type=float,
        metavar="SECONDS",
        help="longest one upstream blob download may take (default: 10 min plus its size at 256 KiB/s)",
    )
    p.add_argument(
        "--upstream-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="connect timeout and longest upstream silence (default 30)",
    )
    add_store_options(p, required=False)
    p.add_argument("--convert-workers", type=int, default=1, metavar="N", help="conversions at once (default 1)")
    p.add_argument("--convert-retries", type=int, default=5, metavar="N", help="attempts per image before giving up (default 5)")
    p.add_argument(
        "--retry-backoff", type=float, default=10.0, metavar="SECONDS", help="first retry delay, doubling (default 10)"
    )
    p.add_argument("--convert-timeout", type=float, default=3600.0, metavar="SECONDS", help="longest conversion (default 3600)")
    p.add_argument(
        "--platform", action="append", metavar="OS/ARCH", help="platforms to convert from an index (default: this machine's)"
    )
    p.add_argument(
        "--max-manifest-size",
        type=size_arg(1),
        default=MAX_MANIFEST_BYTES,
        help=f"largest manifest passed on (default {format_size(MAX_MANIFEST_BYTES)})",
    )
    p.add_argument(
        "--log-level",
        dest="proxy_log_level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level of the service; info logs every request (default info)",
    )
    p.set_defaults(run=run_serve)
    actions = p.add_subparsers(dest="proxy_action", metavar="[config]", title="actions (none: serve)")
    c = actions.add_parser(
        "config",
        allow_abbrev=False,
        help="print (or write) containerd's certs.d/<registry>/hosts.toml for each upstream",
        description="containerd then pulls those registries through the proxy (and directly if the proxy fails).",
    )
    c.add_argument("--proxy-url", required=True, help="the proxy's address as nodes reach it, e.g. http://10.0.0.5:5050")
    _upstream_options(c, required=True)
    c.add_argument("--hosts-dir", metavar="DIR", help="write DIR/<registry>/hosts.toml instead of printing")
    c.add_argument("--ca-file", metavar="FILE", help="CA certificate of an https proxy URL (as nodes see the path)")
    c.set_defaults(run=run_config)


def run_serve(args: argparse.Namespace) -> int:
    import asyncio

    from layerstore.errors import LiftoffError
    from layerstore.oci.platform import host_platform
    from registry_proxy.config import ProxyConfig, parse_upstreams
    from registry_proxy.server import serve

    logging.getLogger().setLevel(args.proxy_log_level.upper())
    if not args.upstream:
        raise LiftoffError("no upstream registry: pass --upstream NAME=URL (e.g. docker.io=https://registry-1.docker.io)")
    upstreams = parse_upstreams(args.upstream, args.plain_http, args.pass_credentials)
    if args.default_upstream and args.default_upstream not in {u.name for u in upstreams}:
        raise LiftoffError(f"--default-upstream {args.default_upstream}: no such --upstream")
    for flag, value in (("--convert-workers", args.convert_workers), ("--convert-retries", args.convert_retries)):
        if value < 1:
            raise LiftoffError(f"{flag} must be at least 1")
    config = ProxyConfig(
        upstreams=upstreams,
        listen=args.listen,
        default_upstream=args.default_upstream,
        cache_dir=Path(args.cache_dir),
        cache_size=args.cache_size,
        tag_ttl=args.tag_ttl,
        upstream_timeout=args.upstream_timeout,
        fetch_timeout=args.fetch_timeout,
        docker_config=args.docker_config,
        stores=args.store or [],
        store_options=store_options(args),
        convert_workers=args.convert_workers,
        convert_retries=args.convert_retries,
        retry_backoff=args.retry_backoff,
        convert_timeout=args.convert_timeout,
        platforms=args.platform or [str(host_platform())],
        max_manifest_bytes=args.max_manifest_size,
    )
    asyncio.run(serve(config))
    return 0


def run_config(args: argparse.Namespace) -> int:
    from registry_proxy.config import parse_upstreams
    from registry_proxy.hosts import check_proxy_url, hosts_toml, write_hosts_dir

    upstreams = parse_upstreams(args.upstream, args.plain_http)
    proxy_url = check_proxy_url(args.proxy_url)
    if args.hosts_dir:
        for path in write_hosts_dir(Path(args.hosts_dir), upstreams, proxy_url, args.ca_file):
            print(path)
        return 0
    for i, upstream in enumerate(upstreams):
        print(("\n" if i else "") + f"# ---- certs.d/{upstream.name}/hosts.toml ----")
        print(hosts_toml(upstream, proxy_url, args.ca_file), end="")
    return 0
