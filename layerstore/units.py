"""Byte sizes as users write them on command lines, and as liftoff prints them.

One parser for every size option: plain bytes (`4096`), or a number with a binary unit
K, M, G or T, optionally followed by `i` and/or `B`, in any case and with an optional
space (`128K`, `16MiB`, `1.5G`, `20 GB`, `512m`); units are powers of 1024.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
MAX_SIZE = 1 << 60  # far beyond any cache or range; keeps a typo from becoming a huge number
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?:([kmgt])i?b?|b?)", re.IGNORECASE)
_EXAMPLES = "bytes, or a number with K, M, G or T (binary units), e.g. 4096, 128K, 16MiB, 1.5G"


def parse_size(text: str) -> int:
    """Bytes from `text` (see the module docstring); ValueError with a one-line reason otherwise."""
    match = _SIZE.fullmatch(text.strip()) if len(text) <= 64 else None
    if match is None:
        raise ValueError(f"{text!r} is not a size: expected {_EXAMPLES}")
    number, unit = match.group(1), (match.group(2) or "").lower()
    if not unit and "." in number:
        raise ValueError(f"{text!r} is not a size: bytes must be a whole number; expected {_EXAMPLES}")
    value = int(float(number) * UNITS[unit]) if "." in number else int(number) * UNITS[unit]
    if value > MAX_SIZE:
        raise ValueError(f"{text!r} is too large a size (at most {format_size(MAX_SIZE)})")
    return value


def size_arg(minimum: int = 0, maximum: int = MAX_SIZE) -> Callable[[str], int]:
    """An argparse `type=` for a size in [minimum, maximum]: a bad value is one usage error line."""

    def parse(text: str) -> int:
        try:
            value = parse_size(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if not minimum <= value <= maximum:
            bounds = f"between {format_size(minimum)} and {format_size(maximum)}"
            if maximum >= MAX_SIZE:
                bounds = f"at least {format_size(minimum)}"
            raise argparse.ArgumentTypeError(f"{text!r}: the size must be {bounds}")
        return value

    parse.__name__ = "size"  # argparse names the type in some messages
    return parse


def format_size(n: int | float) -> str:
    """A short human form in binary units: 512 B, 128 KiB, 16 MiB, 1.5 GiB (one decimal; parse_size reads it)."""
    n = int(n)
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"
