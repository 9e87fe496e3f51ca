"""Helpers for the pull tests: `liftoff pull` as a process, ctr queries, containerd's content labels."""

from __future__ import annotations

import json
import time
import uuid

from snapshotter.containerd_api import ContainerdClient
from tests.conftest import run_cli

SCRIPT = "cat /etc/greeting; ls /etc; ls /opt/replaced; cat /data/link; /app/run.sh; id -u"
EXPECTED = "hello from layer 2\ngreeting\nnew\nhello from layer 2\napp says hi\n0\n"
GC = "containerd.io/gc.ref."
SOURCE = "containerd.io/distribution.source.127.0.0.1"


def pull(address: str, ref: str, ns: str, *extra: str) -> dict:
    done = run_cli("pull", ref, "--address", address, "--plain-http", "--namespace", ns, "--json", *extra)
    return json.loads(done.stdout)


def pull_error(*args: str) -> str:
    """stderr of a `liftoff pull` that must fail with exit code 1 and one line, no traceback."""
    done = run_cli("pull", *args, check=False, timeout=120)
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("liftoff: error: "), done.stderr
    return lines[0]


def run(containerd, ns: str, ref: str, script: str) -> str:
    container = f"pull-test-{uuid.uuid4().hex[:8]}"
    return containerd.ctr("run", "--rm", "--snapshotter", "liftoff", ref, container, "/bin/sh", "-c", script, namespace=ns)


def snapshots(containerd, ns: str) -> dict[str, str]:
    """`ctr snapshot ls` as {name: parent} (every row must be committed)."""
    rows = {}
    for line in containerd.ctr("snapshot", "--snapshotter", "liftoff", "ls", namespace=ns).splitlines()[1:]:
        fields = line.split()
        assert fields[-1] == "Committed", line
        rows[fields[0]] = fields[1] if len(fields) == 3 else ""
    return rows


def parents(chain: list[str]) -> dict[str, str]:
    """{chainID: parent chainID} of a layer chain, as `snapshots` shows it."""
    return dict(zip(chain, ["", *chain[:-1]], strict=True))


def content(containerd, ns: str) -> set[str]:
    return {line.split()[0] for line in containerd.ctr("content", "ls", "-q", namespace=ns).splitlines()}


def labels(address: str, ns: str, digest: str) -> dict[str, str]:
    with ContainerdClient(address, ns) as client:
        info = client.content_info(digest)
    assert info is not None, f"{digest} is not in containerd's content store"
    return dict(info.labels)


def blob_gets_after(registry, before: int, expected: int) -> int:
    """Registry blob GETs since `before`, once the access log has `expected` of them (or after 5 s)."""
    deadline = time.monotonic() + 5
    while registry.blob_gets() - before < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    return registry.blob_gets() - before
