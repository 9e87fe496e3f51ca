"""The containerd configuration that makes containerd use liftoff as a snapshotter."""

from __future__ import annotations

DEFAULT_SOCKET = "/run/liftoff/snapshotter.sock"
DEFAULT_ROOT = "/var/lib/liftoff/snapshotter"
PLUGIN_NAME = "liftoff"
DEFAULT_CACHE_SIZE = "20G"


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def containerd_snippet(socket_path: str = DEFAULT_SOCKET) -> str:
    """TOML for containerd's config.toml (version 2): the proxy plugin and the CRI snapshotter line."""
    return (
        "# liftoff snapshotter: add to /etc/containerd/config.toml (version = 2), then restart containerd.\n"
        "# Start liftoff-snapshotter.service first: containerd only sees images of a snapshotter that was up when it started.\n"
        "[proxy_plugins]\n"
        f"  [proxy_plugins.{PLUGIN_NAME}]\n"
        '    type = "snapshot"\n'
        f"    address = {_toml_string(socket_path)}\n"
        "\n"
        "# Kubernetes (CRI): unpack and run images with liftoff. Keeping snapshot annotations on\n"
        "# passes each layer's labels to the snapshotter at pull time.\n"
        '[plugins."io.containerd.grpc.v1.cri".containerd]\n'
        f'  snapshotter = "{PLUGIN_NAME}"\n'
        "  disable_snapshot_annotations = false\n"
    )
