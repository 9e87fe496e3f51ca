"""`liftoff profile`: record which chunks a real start of an image reads, and store that
startup profile with the image record, so every later start prefetches exactly that.

By default the layer indexes are then rewritten around the byte ranges the start read
(converter/relayout.py), so the profile's chunks hold little but what a start needs.

The image is started once, lazily, through the liftoff snapshotter, while the FUSE daemon
records its view's reads (the kernel's caches dropped first). The start ends when the
command exits, when it prints a given line (a server that is ready), or after N seconds.
Without --address, a private containerd, snapshotter and FUSE daemon are started for it
(the CI case, right after `liftoff convert`).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

from layerstore.catalog import load_record, set_profile
from layerstore.errors import LiftoffError, ObjectNotFound
from layerstore.oci.auth import DockerCredentials
from layerstore.oci.manifest import Descriptor, Node, parse_document, select_manifests
from layerstore.oci.platform import host_platform, parse_platform
from layerstore.oci.reference import parse_reference
from layerstore.oci.registry import RegistryClient
from layerstore.records import ImageRecord
from layerstore.stores import Store, StoreChain
from snapshotter import pull as pulling
from snapshotter.fuse_control import PROFILE_NEEDS, FusedClient, view_id
from snapshotter.localnode import start_containerd, start_snapshotter
from snapshotter.profile import summarize

log = logging.getLogger(__name__)

NAMESPACE = "liftoff-profile"
DEFAULT_FUSED_SOCKET = "/var/lib/liftoff/snapshotter/remote/fused.sock"


def drop_caches() -> None:
    """Drop the kernel's page, dentry and inode caches, so a start reads through FUSE again."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
    except OSError as e:
        log.warning("cannot drop the kernel's caches (%s): files read before may be missing from the profile", e)


def _manifest_digest(image: str, plain_http: bool, docker_config: str | None, platform: str | None) -> str:
    """The digest of the image's manifest for this platform."""
    ref = parse_reference(image)
    client = RegistryClient(
        ref.registry, endpoint=ref.endpoint, plain_http=plain_http, credentials=DockerCredentials(docker_config)
    )
    try:
        media_type, body, digest = client.get_manifest(ref)
        top = Node(digest, body, parse_document(body, media_type, image))
        wanted = parse_platform(platform) if platform else host_platform()

        def fetch(child: Descriptor) -> tuple[str, bytes]:
            child_type, child_body, _ = client.get_manifest(ref, child.digest)
            return child_type, child_body

        return select_manifests(top, fetch, [wanted], image, first=True)[0][-1].digest
    finally:
        client.close()


def run_container(
    address: str,
    image: str,
    command: list[str],
    until_line: str | None,
    seconds: float | None,
    timeout: float,
    net_host: bool = False,
) -> tuple[str, str]:
    """Run the image once; returns (how it ended, its output)."""
    container = f"liftoff-profile-{uuid.uuid4().hex[:8]}"
    argv = [
        "ctr",
        "--address",
        address,
        "--namespace",
        NAMESPACE,
        "run",
        "--rm",
        "--snapshotter",
        "liftoff",
        *(["--net-host"] if net_host else []),
        image,
        container,
        *command,
    ]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    matched = threading.Event()

    def reader() -> None:
        for line in process.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if until_line and until_line in line:
                matched.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    limit = seconds if seconds else timeout
    deadline = time.monotonic() + limit
    ended = "exit"
    while process.poll() is None:
        if matched.is_set():
            ended = f"printed {until_line!r}"
            break
        if time.monotonic() > deadline:
            ended = f"{limit:g} seconds" if seconds else "timeout"
            break
        time.sleep(0.05)
    if process.poll() is None:
        subprocess.run(
            ["ctr", "--address", address, "--namespace", NAMESPACE, "task", "kill", "-s", "SIGKILL", container],
            capture_output=True,
        )
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
    thread.join(5)
    if ended == "exit" and process.returncode != 0:
        raise LiftoffError(f"the profiled command exited with {process.returncode}: {''.join(lines)[-500:]}")
    if ended == "timeout":
        raise LiftoffError(f"the profiled start neither exited nor printed {until_line!r} within {timeout:g} s")
    return ended, "".join(lines)


def record_profile(
    image: str,
    stores: list[Store],
    *,
    store_args: list[str],
    command: list[str] | None = None,
    until_line: str | None = None,
    seconds: float | None = None,
    plain_http: bool = False,
    docker_config: str | None = None,
    platform: str | None = None,
    address: str | None = None,
    fused_socket: str = DEFAULT_FUSED_SOCKET,
    timeout: float = 600.0,
    relayout: bool = True,
    net_host: bool = False,
) -> dict:
    """Record and store the startup profile of `image` (converted already); returns it."""
    if os.geteuid() != 0:
        raise LiftoffError("recording a profile runs containers and drops kernel caches: run it as root")
    digest = _manifest_digest(image, plain_http, docker_config, platform)
    try:
        record = load_record(StoreChain(stores), digest)
    except ObjectNotFound:
        raise LiftoffError(f"{image} ({digest}) is not converted in the store: run liftoff convert first") from None
    if not isinstance(record, ImageRecord):
        raise LiftoffError(f"{digest} is an index, not an image")
    layers = [layer.digest for layer in record.layers]
    workdir = None
    services = []
    try:
        if address is None:
            workdir = Path(tempfile.mkdtemp(prefix="liftoff-profile-", dir="/var/tmp"))
            socket = workdir / "run" / "snapshotter.sock"
            services.append(start_snapshotter(workdir / "root", socket, workdir=workdir, log_level="info", extra_args=store_args))
            containerd = start_containerd(workdir / "containerd", socket)
            services.append(containerd)
            address = containerd.address
            fused = FusedClient(workdir / "root" / "remote" / "fused.sock", needs=PROFILE_NEEDS)
        else:
            fused = FusedClient(fused_socket, needs=PROFILE_NEEDS)
            fused.check(PROFILE_NEEDS)  # before the pull: a daemon that cannot record is named now
        pulling.pull(
            image,
            address,
            snapshotter="liftoff",
            namespace=NAMESPACE,
            plain_http=plain_http,
            docker_config=docker_config,
            platform=platform,
        )
        view = view_id(layers, False)
        fused.start_recording(view, layers, False)
        drop_caches()
        started = time.monotonic()
        try:
            ended, output = run_container(address, image, list(command or []), until_line, seconds, timeout, net_host)
        finally:
            trace = fused.stop_recording(view)
        trace.update(command=list(command or []), ended=ended, seconds=round(time.monotonic() - started, 3), starts=1)
        del output
        if relayout and trace.get("ranges"):
            from converter.relayout import relayout_image

            read_chunks = len(trace["chunks"])
            trace["chunks"] = relayout_image(stores, record, trace)
            trace["layout"] = "relayout"
            log.info("relayout: the start read %d original chunks; it now needs %d hot chunks", read_chunks, len(trace["chunks"]))
        set_profile(stores, digest, trace)
        if workdir is None:  # a shared containerd: leave nothing behind
            subprocess.run(["ctr", "--address", address, "--namespace", NAMESPACE, "image", "rm", image], capture_output=True)
        log.info("profile of %s: %s", image, summarize(trace))
        return trace
    finally:
        for service in reversed(services):
            service.stop()
        if workdir is not None:
            FusedClient(workdir / "root" / "remote" / "fused.sock").shutdown()
            shutil.rmtree(workdir, ignore_errors=True)
