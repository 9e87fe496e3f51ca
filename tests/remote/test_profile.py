"""Startup profiles: recording a real start, relayout around what it read, prefetch at the next
start, merging learned traces; and the relayout keeps every byte of every file."""

from __future__ import annotations

import json
import random
import re
import time

from converter.relayout import _hot_spans, relayout_layer
from converter.upload import ChunkUploader
from layerstore.catalog import find_image, load_index
from layerstore.index import decompress_chunk
from layerstore.layout import chunk_key
from layerstore.stores import StoreChain, open_store
from liftoff.devstack.ocibuild import LayoutWriter, Member, make_tar
from tests.conftest import run_cli
from tests.converter.images import oracle_entries, stored_entries
from tests.remote.conftest import convert, liftoff_pull, start_stack

COMMAND = ["/bin/sh", "-c", "cat /etc/os-release; head -c 4096 /lib/big.so | sha256sum | cut -c1-12"]


def profile_of(store_url: str, ref: str) -> dict:
    _, record = find_image(StoreChain([open_store(store_url)]), ref)
    return record.profile


def test_record_relayout_and_prefetch(tmp_path_factory, conformance_image, store_url):
    convert(conformance_image, store_url)
    out = run_cli("profile", conformance_image.ref, "--plain-http", "--store", store_url, "--json", "--", *COMMAND).stdout
    profile = json.loads(out)
    assert profile["ended"] == "exit" and profile["layout"] == "relayout"
    assert "/etc/os-release" in profile["files"] and "/lib/big.so" in profile["files"]
    stored = profile_of(store_url, conformance_image.ref)
    assert stored["chunks"] == profile["chunks"]
    big = next(r for r in profile["ranges"] if bytes.fromhex(r["path"]) == b"lib/big.so")
    assert big["ranges"][0][0] == 0 and big["ranges"][-1][1] < 3 << 20  # only the head of the 3 MiB file was read
    read_bytes = sum(end - start for r in profile["ranges"] for start, end in _hot_spans(r["ranges"], 1 << 40))
    hot_bytes = sum(c["size"] for c in profile["chunks"])
    assert hot_bytes <= read_bytes  # the hot chunks hold what the start read (page-aligned), nothing more
    # the layers still hold exactly the image's bytes
    run_cli("verify", conformance_image.ref, "--store", store_url, "--source", conformance_image.ref, "--plain-http")

    # the next start prefetches the profile and fetches nothing else
    stack = start_stack(tmp_path_factory.mktemp("profiled"), store_url)
    try:
        liftoff_pull(stack, conformance_image.ref)
        first = stack.containerd.ctr("run", "--rm", "--snapshotter", "liftoff", conformance_image.ref, "p1", *COMMAND)
        assert first.startswith("NAME=liftoff-test")
        status = stack.fused().status()
        assert status.prefetch.profile_chunks == len(profile["chunks"])
        assert status.fetch.chunks == len(profile["chunks"]), status  # every read was covered by the profile
        # the profile's files went into the page cache as the prefetch brought them (snapshotter/page_fill.py)
        deadline = time.monotonic() + 10
        while not (
            filled := re.search(rb"page fill of view \w+: (\d+) files", (stack.root / "remote" / "fused.log").read_bytes())
        ):
            assert time.monotonic() < deadline, "no page fill"
            time.sleep(0.1)
        assert int(filled[1]) >= 1
    finally:
        stack.stop()


def test_merge_learned_traces(tmp_path_factory, conformance_image, store_url):
    convert(conformance_image, store_url)
    stack = start_stack(tmp_path_factory.mktemp("learn"), store_url, fused_args=["--learn-seconds", "1.5"])
    traces_dir = stack.root / "remote" / "traces"
    try:
        liftoff_pull(stack, conformance_image.ref)
        stack.containerd.ctr(
            "run", "--rm", "--snapshotter", "liftoff", conformance_image.ref, "learn", "sh", "-c", "cat /app/model.bin >/dev/null"
        )
        deadline = time.monotonic() + 10
        while not (traces_dir.exists() and list(traces_dir.glob("*.json"))) and time.monotonic() < deadline:
            time.sleep(0.2)
        traces = sorted(traces_dir.glob("*.json"))
        assert traces, "the FUSE daemon kept no trace of the start"
    finally:
        stack.stop()
    before = profile_of(store_url, conformance_image.ref) or {}
    merged = json.loads(
        run_cli("profile", conformance_image.ref, "--store", store_url, "--merge", str(traces[0]), "--json").stdout
    )
    learned = json.loads(traces[0].read_text())
    assert {c["sha256"] for c in learned["chunks"]} <= {c["sha256"] for c in merged["chunks"]}
    assert "/app/model.bin" in merged["files"]
    assert merged["starts"] == before.get("starts", 0) + 1
    assert profile_of(store_url, conformance_image.ref)["chunks"] == merged["chunks"]


def test_relayout_keeps_every_byte(tmp_path):
    rng = random.Random(3)
    files = [Member("d", "dir")]
    files += [Member(f"d/small-{i}", data=rng.randbytes(rng.randint(0, 9000))) for i in range(60)]
    files += [Member("d/large", data=rng.randbytes(700_000)), Member("d/link", "hardlink", linkname="d/large")]
    tar = make_tar(files)
    writer = LayoutWriter(tmp_path / "layout")
    writer.tag(writer.add_image([tar]), "v1")
    store_url = f"file://{tmp_path / 'store'}"
    run_cli("convert", f"oci:{tmp_path / 'layout'}:v1", "--store", store_url, "--chunk-size", "64K")
    store = open_store(store_url)
    chain = StoreChain([store])
    _, record = find_image(chain, "sha256:" + next(iter(store.list("images/"))).rsplit("/", 1)[1])
    index = load_index(chain, record.layers[0].digest)
    hot = [
        (b"d/large", [[100, 5000], [300_000, 310_000], [699_000, 700_000]]),
        (b"d/small-7", [[0, 10]]),
        (b"d/small-3", [[0, 100]]),
        (b"d/nope", [[0, 1]]),
    ]
    uploader = ChunkUploader([store], workers=2)
    try:
        infos = relayout_layer([store], index, hot, uploader)
    finally:
        uploader.close()
    assert 1 <= len(infos) <= 2  # ~40 KiB of hot pages packed together

    def chunk(i):
        c = index.chunks[i]
        return decompress_chunk(store.get(chunk_key(c.sha256)), c.sha256, c.size, "test")

    assert stored_entries(index, chunk) == oracle_entries(tar)
    large = next(e for e in index.entries if e.path == b"d/large")
    hot_slots = {index.chunks.__len__() - len(infos) + i for i in range(len(infos))}
    assert any(extent.chunk in hot_slots for extent in large.extents)


def test_cri_pull_prefetches_the_profile(tmp_path_factory, conformance_image, store_url):
    """kubelet's path (CRI PullImage, containerd's unpacker, no image labels by default) starts the profile's
    prefetch during the pull, as `liftoff pull` does: before any container asks for a byte."""
    from snapshotter.cri import CRIImageClient

    convert(conformance_image, store_url)
    run_cli("profile", conformance_image.ref, "--plain-http", "--store", store_url, "--", *COMMAND)
    chunks = len(profile_of(store_url, conformance_image.ref)["chunks"])
    stack = start_stack(tmp_path_factory.mktemp("cri-profiled"), store_url, cri=True)
    try:
        with CRIImageClient(stack.containerd.address) as client:
            client.wait_ready()
            client.pull(conformance_image.ref)
        deadline = time.monotonic() + 20
        status = stack.fused().status()
        while status.prefetch.profile_chunks < chunks and time.monotonic() < deadline:
            time.sleep(0.1)
            status = stack.fused().status()
        assert status.prefetch.profile_chunks == chunks, status.prefetch
        out = stack.containerd.ctr(
            "run", "--rm", "--snapshotter", "liftoff", conformance_image.ref, "cri-p1", *COMMAND, namespace="k8s.io"
        )
        assert out.startswith("NAME=liftoff-test")
        assert stack.fused().status().fetch.chunks == chunks  # every read was covered by the profile
    finally:
        stack.stop()
