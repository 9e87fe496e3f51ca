"""Platforms (os/architecture/variant): one parser, one normalisation, one matcher, and this host's platform.

Normalisation follows containerd's: x86_64/x86-64 are amd64, aarch64 is arm64 and arm64's
default variant v8 is no variant, armhf is arm/v7, armel arm/v6, a bare arm is arm/v7, i386/i686
are 386. A wanted platform without a variant matches every variant of its os/architecture; the
"unknown/unknown" entries of an index (build attestations) are never runnable and match nothing.
"""

from __future__ import annotations

import platform as _host
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from layerstore.errors import ImageError, LiftoffError

_ARCH = {"x86_64": "amd64", "x86-64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
         "i386": "386", "i686": "386", "386": "386", "armhf": "arm", "armel": "arm"}  # fmt: skip
_ARCH_VARIANT = {"armhf": "v7", "armel": "v6"}
_HOST_MACHINE = {"armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"), "armv8l": ("arm", "v8")}


@dataclass(frozen=True)
class Platform:
    """A normalised platform; `variant` is "" when there is none (or it is the architecture's default)."""

    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    @property
    def runnable(self) -> bool:
        """False for the unknown/unknown entries indexes carry for attestations."""
        return self.os != "unknown" and self.architecture != "unknown"

    def matches(self, candidate: Platform | None) -> bool:
        """Whether `candidate` (an index entry's platform) is this wanted platform; no variant here means any."""
        if candidate is None or not candidate.runnable:
            return False
        if (candidate.os, candidate.architecture) != (self.os, self.architecture):
            return False
        return not self.variant or candidate.variant == self.variant


def normalize(os: str, architecture: str, variant: str = "") -> Platform:
    """containerd's normalisation of an os/architecture/variant triple."""
    os, arch, variant = os.lower(), architecture.lower(), variant.lower()
    variant = _ARCH_VARIANT.get(arch, variant)
    arch = _ARCH.get(arch, arch)
    if (arch, variant) in (("amd64", "v1"), ("arm64", "8"), ("arm64", "v8"), ("arm64", "v8.0")):
        variant = ""  # the architecture's default
    elif arch == "arm" and variant in ("", "7"):
        variant = "v7"
    elif arch == "arm" and variant in ("5", "6", "8"):
        variant = "v" + variant
    return Platform(os, arch, variant)


def parse_platform(text: str) -> Platform:
    """A platform as users write it: os/arch or os/arch/variant (linux/amd64, linux/arm64/v8, linux/arm/v7).

    A bare "linux/arm" keeps no variant (it matches every arm variant), as for any architecture."""
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise LiftoffError(f"invalid platform {text!r}: expected os/arch or os/arch/variant, e.g. linux/amd64")
    if len(parts) == 2:
        found = normalize(parts[0], parts[1])
        return Platform(found.os, found.architecture) if found.architecture == "arm" else found
    return normalize(*parts)


def parse_platforms(texts: Iterable[str] | None) -> list[Platform] | None:
    """parse_platform of each; None (every platform) for None or an empty list."""
    found = [parse_platform(t) for t in texts or ()]
    return found or None


def platform_from_json(value: Any, what: str) -> Platform:
    """The platform object of a descriptor ({"os", "architecture", "variant"?}); ImageError if malformed."""
    if not isinstance(value, Mapping):
        raise ImageError(f"{what}: platform is not an object")
    os, arch, variant = value.get("os"), value.get("architecture"), value.get("variant", "")
    if not isinstance(os, str) or not isinstance(arch, str) or not os or not arch or not isinstance(variant, str):
        raise ImageError(f"{what}: platform needs string os and architecture (and variant), got {dict(value)!r}"[:300])
    return normalize(os, arch, variant)


def platform_text(value: Mapping[str, Any] | None) -> str:
    """os/architecture[/variant] of a recorded platform mapping (image records, configs), as stored."""
    value = value or {}
    return "/".join(str(value[k]) for k in ("os", "architecture", "variant") if value.get(k))


def host_platform() -> Platform:
    """This machine's platform as an image index names it (linux/amd64, linux/arm64, linux/arm/v7, ...)."""
    machine = _host.machine().lower()
    if machine in _HOST_MACHINE:
        return normalize("linux", *_HOST_MACHINE[machine])
    return normalize("linux", machine)
