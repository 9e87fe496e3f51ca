"""liftoff rm and liftoff gc: what no image references is freed, what one does is kept, and gc never
runs beside a writer (leases)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from converter.relayout import relayout_image
from layerstore.catalog import find_image, load_index, set_profile
from layerstore.layout import CHAINS, CHUNKS, IMAGES, LAYERS, chain_key, chunk_key, image_key, layer_index_key
from layerstore.leases import LEASES
from layerstore.stores import StoreChain, open_store
from liftoff.devstack.ocibuild import LayoutWriter, Member, make_tar
from liftoff.devstack.services import push_layout
from tests.conftest import ROOT, run_cli
from tests.converter.images import CHUNK, kitchen_sink_layers, many_files_layer


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """Images a and b share their base layer; m is a two-platform index whose arm64 image is also tagged alone."""
    root = tmp_path_factory.mktemp("gc")
    writer = LayoutWriter(root)
    base = many_files_layer(300)
    writer.tag(writer.add_image([base, kitchen_sink_layers()[0]]), "a")
    writer.tag(writer.add_image([base, many_files_layer(200, seed=9)]), "b")
    amd = writer.add_image([make_tar([Member("amd", data=random.Random(1).randbytes(300_000))])])
    arm = writer.add_image([make_tar([Member("arm", data=random.Random(2).randbytes(300_000))])], platform=("linux", "arm64"))
    writer.tag(writer.add_index([amd, arm]), "m")
    writer.tag(arm, "arm-only")
    return root


def convert(source: str, store: str, *args: str) -> dict:
    return json.loads(run_cli("convert", source, "--store", store, "--json", "--chunk-size", str(CHUNK), *args).stdout)


def gc(store: str, *args: str, check: bool = True) -> dict | subprocess.CompletedProcess:
    done = run_cli("gc", "--store", store, "--json", *args, check=check)
    return json.loads(done.stdout) if check else done


def keys(store: str) -> dict[str, set[str]]:
    s = open_store(store)
    return {prefix: set(s.list(prefix)) for prefix in (CHUNKS, LAYERS, CHAINS, IMAGES, LEASES)}


def reachable(store: str, digest: str) -> set[str]:
    """The objects image `digest` needs: its layers' indexes and chunks, its chain records."""
    chain = StoreChain([open_store(store)])
    _, record = find_image(chain, digest)
    out = set()
    for layer in record.layers:
        out |= {layer_index_key(layer.digest), chain_key(layer.chain_id)}
        out |= {chunk_key(c.sha256) for c in load_index(chain, layer.digest).chunks}
    return out


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_rm_then_gc_frees_what_only_the_removed_image_used(kind, layout, tmp_path, s3_store_url):
    store = f"file://{tmp_path / 'store'}" if kind == "file" else s3_store_url
    a = convert(f"oci:{layout}:a", store)["manifest_digest"]
    b = convert(f"oci:{layout}:b", store)["manifest_digest"]
    needed_a, needed_b = reachable(store, a), reachable(store, b)
    before = keys(store)
    assert gc(store)["removed"] == {"chunks": 0, "layers": 0, "chains": 0}  # nothing is garbage yet

    out = run_cli("rm", b, "--store", store).stdout
    assert b in out and "liftoff gc" in out
    assert image_key(b) not in keys(store)[IMAGES]
    dry = gc(store, "--dry-run")
    assert dry["dry_run"] and dry["removed"]["chunks"] > 0 and keys(store) == {**before, IMAGES: before[IMAGES] - {image_key(b)}}

    report = gc(store)
    doomed = needed_b - needed_a
    assert (
        report["removed"]
        == {
            "chunks": sum(k.startswith(CHUNKS) for k in doomed),
            "layers": sum(k.startswith(LAYERS) for k in doomed),
            "chains": sum(k.startswith(CHAINS) for k in doomed),
        }
        == dry["removed"]
    )
    assert report["removed"]["layers"] == 1 and report["removed"]["chains"] == 1  # b's own top layer; the base stays
    after = keys(store)
    assert not (after[CHUNKS] | after[LAYERS] | after[CHAINS]) & doomed
    assert needed_a <= after[CHUNKS] | after[LAYERS] | after[CHAINS]
    assert after[LEASES] == set()  # gc's and the converts' leases are gone
    run_cli("verify", a, "--store", store)
    assert gc(store)["removed"] == {"chunks": 0, "layers": 0, "chains": 0}
    # the removed image converts again, whole: its chunks are uploaded anew
    again = convert(f"oci:{layout}:b", store)
    assert again["chunks_new"] > 0
    run_cli("verify", b, "--store", store)


def test_rm_of_an_index_keeps_platforms_converted_under_their_own_name(layout, tmp_path, registry):
    store = f"file://{tmp_path / 'store'}"
    multi = push_layout(layout, "m", registry.host, "gc/multi")
    arm_only = push_layout(layout, "arm-only", registry.host, "gc/arm")
    images = convert(multi, store, "--plain-http")["images"]
    amd, arm = (i["manifest_digest"] for i in images)
    convert(arm_only, store, "--plain-http")
    amd_only = reachable(store, amd)
    done = run_cli("rm", arm, "--store", store, check=False)
    assert done.returncode == 1 and "is a platform of the multi-platform image" in done.stderr
    ls = {row["digest"]: row for row in json.loads(run_cli("ls", "--store", store, "--json").stdout)}
    index_digest = next(d for d, row in ls.items() if row["kind"] == "index")
    run_cli("rm", index_digest, "--store", store)
    left = keys(store)[IMAGES]
    assert left == {image_key(arm)}  # amd went with the index; arm was also converted as arm-only
    assert gc(store)["removed"]["layers"] == 1
    after = keys(store)
    assert not amd_only & (after[CHUNKS] | after[LAYERS] | after[CHAINS])
    run_cli("verify", arm, "--store", store)


def test_gc_keeps_the_chunks_of_an_older_profile_layout(tmp_path):
    rng = random.Random(4)
    files = [Member("d", "dir"), Member("d/large", data=rng.randbytes(900_000))]
    files += [Member(f"d/small-{i}", data=rng.randbytes(5000)) for i in range(40)]
    writer = LayoutWriter(tmp_path / "layout")
    writer.tag(writer.add_image([make_tar(files)]), "v1")
    store_url = f"file://{tmp_path / 'store'}"
    digest = convert(f"oci:{tmp_path / 'layout'}:v1", store_url)["manifest_digest"]
    store = open_store(store_url)
    before = set(store.list(CHUNKS))

    def record_profile(ranges: list[list[int]]) -> None:
        _, record = find_image(StoreChain([store]), digest)
        trace = {"ranges": [{"layer": record.layers[0].digest, "path": b"d/large".hex(), "ranges": ranges}]}
        set_profile([store], digest, {"chunks": relayout_image([store], record, trace)})

    record_profile([[0, 4096], [800_000, 810_000]])
    first_hot = set(store.list(CHUNKS)) - before
    assert first_hot and gc(store_url)["removed"]["chunks"] == 0  # the cold bytes stay in the original chunks
    record_profile([[0, 4096], [300_000, 310_000], [800_000, 810_000]])  # a new recording of a longer start
    second_hot = set(store.list(CHUNKS)) - before - first_hot
    assert second_hot
    # a node that mounted the image before the re-recording reads through the older layout: the index's chunk
    # table still names those chunks, so gc keeps them
    assert gc(store_url)["removed"]["chunks"] == 0
    assert first_hot | second_hot <= set(store.list(CHUNKS))
    run_cli("verify", digest, "--store", store_url, "--source", f"oci:{tmp_path / 'layout'}:v1")


def test_gc_sweeps_temp_files_and_expired_leases_and_refuses_an_unreadable_record(layout, tmp_path):
    store_url = f"file://{tmp_path / 'store'}"
    root = tmp_path / "store"
    a = convert(f"oci:{layout}:a", store_url)["manifest_digest"]
    orphan = chunk_key(bytes(32))
    store = open_store(store_url)
    store.put(orphan, b"left by a killed conversion")
    temp = root / "chunks" / "sha256" / ".tmp-xyz.123.abcd"
    temp.write_bytes(b"half")
    dead = root / LEASES / "write-elsewhere-1-dead"
    dead.parent.mkdir(exist_ok=True)
    dead.write_text(json.dumps({"kind": "write", "what": "a convert that was killed"}))
    old = time.time() - 3600
    os.utime(dead, (old, old))

    broken = image_key("sha256:" + "ab" * 32)
    store.put(broken, b"{not json")
    done = gc(store_url, check=False)
    assert done.returncode == 1
    assert "gc cannot tell what that image references and deleted nothing" in done.stderr
    assert f"liftoff rm sha256:{'ab' * 32}" in done.stderr
    assert store.size(orphan) is not None and temp.exists() and dead.exists()

    run_cli("rm", "sha256:" + "ab" * 32, "--store", store_url)
    report = gc(store_url)
    assert report["removed"]["chunks"] == 1 and report["temp_files"] == 1 and report["expired_leases"] == 1
    assert store.size(orphan) is None and not temp.exists() and not dead.exists()
    run_cli("verify", a, "--store", store_url)


HOLD = """
import sys
from layerstore.leases import collecting, writing
from layerstore.stores import open_store
store = open_store(sys.argv[2])
hold = writing([store], "a test writer") if sys.argv[1] == "write" else collecting(store, ttl=float(sys.argv[3]))
with hold:
    print("held", flush=True)
    sys.stdin.readline()
"""


def hold_lease(kind: str, store: str, ttl: float = 120) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, kind, store, str(ttl)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_gc_gives_way_to_a_live_writer_and_ignores_a_dead_one(kind, tmp_path, s3_store_url):
    store_url = f"file://{tmp_path / 'store'}" if kind == "file" else s3_store_url
    store = open_store(store_url)
    orphan = chunk_key(bytes(32))
    store.put(orphan, b"garbage")
    writer = hold_lease("write", store_url)
    try:
        done = gc(store_url, check=False)
        assert done.returncode == 3  # busy: retry later
        assert "1 writer(s) active" in done.stderr and "a test writer" in done.stderr and "gc changed nothing" in done.stderr
        assert store.size(orphan) is not None
    finally:
        writer.send_signal(signal.SIGKILL)  # dies holding its lease
        writer.wait()
    assert len(list(store.list(LEASES))) == 1
    time.sleep(2.5)  # S3 times are whole seconds
    report = gc(store_url, "--lease-ttl", "1")
    assert report["expired_leases"] == 1 and report["removed"]["chunks"] == 1
    assert list(store.list(LEASES)) == [] and store.size(orphan) is None


def test_a_conversion_waits_while_gc_holds_the_store(layout, tmp_path):
    store_url = f"file://{tmp_path / 'store'}"
    holder = hold_lease("gc", store_url)
    convert_proc = subprocess.Popen(
        [sys.executable, "-m", "liftoff", "convert", f"oci:{layout}:a", "--store", store_url, "--json"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(4)
        assert convert_proc.poll() is None, convert_proc.communicate()
        assert not list(open_store(store_url).list(CHUNKS)), "the conversion wrote chunks while gc held the store"
    finally:
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(timeout=30)
    out, err = convert_proc.communicate(timeout=120)
    assert convert_proc.returncode == 0, err
    run_cli("verify", json.loads(out)["manifest_digest"], "--store", store_url)


def test_gc_refuses_when_a_live_layer_index_is_corrupt(layout, tmp_path):
    store_url = f"file://{tmp_path / 'store'}"
    a = convert(f"oci:{layout}:a", store_url)["manifest_digest"]
    store = open_store(store_url)
    _, record = find_image(StoreChain([store]), a)
    store.put(layer_index_key(record.layers[1].digest), b"\x28\xb5\x2f\xfd truncated")
    orphan = chunk_key(bytes(32))
    store.put(orphan, b"garbage")
    done = gc(store_url, check=False)
    assert done.returncode == 1
    assert f"gc cannot tell which chunks layer {record.layers[1].digest} needs and deleted nothing" in done.stderr
    assert store.size(orphan) is not None
