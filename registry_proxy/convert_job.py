"""One conversion, run by the proxy as a child process (its own cores and memory, killable on shutdown).

python -m registry_proxy.convert_job --proxy URL --upstream NAME --repository REPO --digest D [--tag T]
    --store URL... [--endpoint-url ...] [--platform os/arch ...]

Reads the image through the proxy (registry_proxy.source) and writes it to the stores with
converter.image.convert_image. Prints the conversion summary as JSON. Exit status: 0 converted,
2 the image cannot be converted (not worth retrying), 1 anything else (retried with backoff).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys

from converter.image import ConvertOptions, convert_image
from layerstore.errors import FormatError, ImageError, LiftoffError
from layerstore.stores import open_stores
from registry_proxy.source import TOKEN_ENV, ProxyImageSource

EXIT_PERMANENT = 2
EXIT_RETRY = 1
PR_SET_PDEATHSIG = 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="registry_proxy.convert_job", description="Convert one image read through liftoff proxy.")
    p.add_argument("--proxy", required=True, help="the proxy's URL, e.g. http://127.0.0.1:5050")
    p.add_argument("--upstream", required=True, help="the upstream registry name (the proxy's ns)")
    p.add_argument("--repository", required=True)
    p.add_argument("--digest", required=True, help="manifest or index digest")
    p.add_argument("--tag", help="the tag it was pulled by (recorded in the image record)")
    p.add_argument("--store", action="append", required=True, metavar="URL")
    p.add_argument("--endpoint-url")
    p.add_argument("--region")
    p.add_argument("--path-style", action="store_true")
    p.add_argument("--platform", action="append", help="os/arch[/variant] to convert from an index (repeat)")
    return p.parse_args(argv)


def die_with_parent() -> None:
    """Ask Linux to end this process when the proxy that started it dies (even by SIGKILL)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the proxy was already gone before prctl took effect
        sys.exit(EXIT_RETRY)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if argv is None:
        die_with_parent()
    token = os.environ.get(TOKEN_ENV, "")
    source = ProxyImageSource(args.proxy, args.upstream, args.repository, args.digest, args.tag, token)
    try:
        stores = open_stores(args.store, endpoint_url=args.endpoint_url, region=args.region, path_style=args.path_style or None)
        result = convert_image(source, stores, ConvertOptions(platforms=args.platform))
    except (ImageError, FormatError) as e:
        print(f"cannot convert {source.name}: {e}", file=sys.stderr)
        return EXIT_PERMANENT
    except LiftoffError as e:
        print(f"converting {source.name} failed: {e}", file=sys.stderr)
        return EXIT_RETRY
    finally:
        source.close()
    print(json.dumps(result.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
