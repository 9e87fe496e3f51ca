"""Restarts: the gRPC snapshotter dies under a running container (which keeps working), and the
FUSE daemon restarts from local state alone while the store is unreachable."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

from snapshotter.localnode import start_snapshotter
from tests.remote.conftest import convert, liftoff_pull, start_stack, stop_fused

LOOP = (
    "i=0; while [ $i -lt 40 ]; do cat /app/model.bin /lib/big.so >/dev/null || exit 3; "
    "if [ $i -eq 25 ]; then sha256sum /lib/zeros.2 >/dev/null || exit 4; fi; i=$((i+1)); sleep 0.1; done; echo survived"
)


@pytest.fixture
def own_stack(tmp_path_factory):
    store = tmp_path_factory.mktemp("restart-store")
    s = start_stack(tmp_path_factory.mktemp("restart"), f"file://{store}")
    yield s, store
    s.stop()


def test_snapshotter_sigkill_under_a_running_container(own_stack, conformance_image):
    stack, _ = own_stack
    convert(conformance_image, stack.store_url)
    liftoff_pull(stack, conformance_image.ref)
    result = {}

    def run() -> None:
        argv = [
            "ctr",
            "--address",
            stack.containerd.address,
            "run",
            "--rm",
            "--snapshotter",
            "liftoff",
            conformance_image.ref,
            "reader",
            "sh",
            "-c",
            LOOP,
        ]
        result["done"] = subprocess.run(argv, capture_output=True, text=True, timeout=120)

    reader = threading.Thread(target=run)
    reader.start()
    time.sleep(1.0)  # the container is up and reading through the FUSE view
    stack.snapshotter.process.send_signal(signal.SIGKILL)
    stack.snapshotter.process.wait()
    assert stack.fused().alive(), "the FUSE daemon must not die with the snapshotter"
    time.sleep(1.0)  # reads (including a file never read before) go on without the snapshotter
    stack.snapshotter = start_snapshotter(
        stack.root, stack.socket, workdir=stack.workdir, extra_args=["--store", stack.store_url]
    )
    stack.wait_reconnected()
    reader.join(timeout=120)
    done = result["done"]
    assert done.returncode == 0 and done.stdout == "survived\n", (done.returncode, done.stdout, done.stderr)
    # the restarted snapshotter re-attached to the same FUSE daemon and serves new containers
    out = stack.containerd.ctr("run", "--rm", "--snapshotter", "liftoff", conformance_image.ref, "after", "/app/run.sh")
    assert out.startswith("lazily started")


def test_fuse_daemon_restarts_from_local_state_without_the_store(own_stack, conformance_image, tmp_path):
    stack, store = own_stack
    convert(conformance_image, stack.store_url)
    liftoff_pull(stack, conformance_image.ref)
    out = stack.containerd.ctr("run", "--rm", "--snapshotter", "liftoff", conformance_image.ref, "warm", "/app/run.sh")
    views = stack.fused().views()
    assert len(views) == 1
    stop_fused(stack.fused())
    hidden = tmp_path / "store-away"
    os.rename(store, hidden)  # the store is now unreachable
    try:
        stack.restart_snapshotter()  # starts the FUSE daemon again: it re-mounts from local state alone
        assert stack.fused().views() == views
        again = stack.containerd.ctr("run", "--rm", "--snapshotter", "liftoff", conformance_image.ref, "cached", "/app/run.sh")
        assert again == out  # served from the cache: the store was not needed
        # a read of a chunk that is not cached waits (retrying) until the store answers again
        result = {}

        def read_uncached() -> None:
            argv = [
                "ctr",
                "--address",
                stack.containerd.address,
                "run",
                "--rm",
                "--snapshotter",
                "liftoff",
                conformance_image.ref,
                "uncached",
                "sh",
                "-c",
                "sha256sum /lib/zeros.2 | cut -c1-8",
            ]
            result["done"] = subprocess.run(argv, capture_output=True, text=True, timeout=120)

        reader = threading.Thread(target=read_uncached)
        reader.start()
        time.sleep(0.8)
    finally:
        os.rename(hidden, store)
    reader.join(timeout=120)
    assert result["done"].returncode == 0 and result["done"].stdout == "30e14955\n", result["done"]
