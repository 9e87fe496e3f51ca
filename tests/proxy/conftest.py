"""Fixtures for the proxy tests: a proxy in front of the session's anonymous registry, test images."""

from __future__ import annotations

import pytest

from tests.proxy.helpers import Proxy, TestImage, push_image, start_proxy


@pytest.fixture(scope="module")
def proxy(registry, tmp_path_factory) -> Proxy:
    """A proxy whose only (default) upstream is the anonymous registry; no conversion."""
    p = start_proxy(tmp_path_factory.mktemp("proxy"), [(registry.host, f"http://{registry.host}")])
    yield p
    p.stop()


@pytest.fixture(scope="module")
def image(registry, tmp_path_factory) -> TestImage:
    """A two-layer image: a small layer (verified before it is sent) and a 3 MiB one (streamed)."""
    return push_image(registry.host, tmp_path_factory.mktemp("images"), "proxy-test/basic", [200_000, 3 << 20])
