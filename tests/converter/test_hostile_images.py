"""Bad images: a one-line error naming image, layer and cause; no image record is ever written."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from layerstore.layout import IMAGES, LAYERS, layer_index_key
from layerstore.stores import open_store
from liftoff.devstack.ocibuild import LayoutWriter, Member, make_tar
from tests.conftest import ROOT, run_cli
from tests.converter.slowregistry import HostileRegistry


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def raw_tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def info(name: str, **kw) -> tarfile.TarInfo:
    i = tarfile.TarInfo(name)
    for k, v in kw.items():
        setattr(i, k, v)
    return i


GOOD = make_tar([Member("ok", data=b"fine\n")])


def layout_with(
    tmp_path, blob: bytes, media_type: str, diff_id: str, *, size: int | None = None, digest: str | None = None
) -> str:
    """An image whose second layer is exactly `blob` with the given descriptor fields."""
    writer = LayoutWriter(tmp_path / "bad")
    good_blob = gzip.compress(GOOD, mtime=0)
    writer.add_blob(good_blob)
    real_digest, real_size = writer.add_blob(blob)
    layers = [
        {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": _sha(good_blob), "size": len(good_blob)},
        {"mediaType": media_type, "digest": digest or real_digest, "size": real_size if size is None else size},
    ]
    if digest:
        (tmp_path / "bad" / "blobs" / "sha256" / digest.split(":")[1]).write_bytes(blob)
    writer.tag(writer.add_manifest(layers, [_sha(GOOD), diff_id]), "bad")
    return f"oci:{tmp_path / 'bad'}:bad"


def hostile_tar_case(members):
    tar = raw_tar([(m, b"x" * m.size) for m in members])
    return gzip.compress(tar, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip", _sha(tar)


def truncated_gzip():
    tar = make_tar([Member("f", data=bytes(range(256)) * 4000)])
    blob = gzip.compress(tar, mtime=0)
    return blob[: len(blob) // 2], "application/vnd.oci.image.layer.v1.tar+gzip", _sha(tar)


def corrupt_zstd():
    import zstandard

    tar = make_tar([Member("f", data=b"abc" * 50000)])
    blob = bytearray(zstandard.ZstdCompressor().compress(tar))
    blob[1] ^= 0xFF  # a damaged frame header
    return bytes(blob), "application/vnd.oci.image.layer.v1.tar+zstd", _sha(tar)


CASES = {
    "dotdot": (lambda: hostile_tar_case([info("../../etc/cron.d/evil", size=4)]), "contains '..'"),
    "absolute": (lambda: hostile_tar_case([info("/etc/passwd", size=4)]), "absolute path"),
    "hardlink-missing": (
        lambda: hostile_tar_case([info("x", type=tarfile.LNKTYPE, linkname="nothing/here")]),
        "not an earlier entry",
    ),
    "hardlink-escape": (
        lambda: hostile_tar_case([info("x", type=tarfile.LNKTYPE, linkname="../../../etc/shadow")]),
        "contains '..'",
    ),
    "symlink-escape": (
        lambda: hostile_tar_case([info("up", type=tarfile.SYMTYPE, linkname="/"), info("up/etc/passwd", size=4)]),
        "beneath the symlink",
    ),
    "truncated-gzip": (truncated_gzip, "corrupt or truncated gzip stream"),
    "corrupt-zstd": (corrupt_zstd, "corrupt or truncated zstd stream"),
    "not-a-tar": (
        lambda: (
            gzip.compress(b"hello world" * 100, mtime=0),
            "application/vnd.oci.image.layer.v1.tar+gzip",
            _sha(b"hello world" * 100),
        ),
        "not a tar stream",
    ),
    "media-type": (lambda: (GOOD, "application/vnd.example.layer.v1.squashfs", _sha(GOOD)), "unsupported layer media type"),
    "diff-id": (
        lambda: (gzip.compress(GOOD, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip", _sha(b"other")),
        "does not match the config's diff_id",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_layer_is_refused_and_nothing_is_written(case, tmp_path, file_store_url):
    make, message = CASES[case]
    blob, media_type, diff_id = make()
    source = layout_with(tmp_path, blob, media_type, diff_id)
    done = run_cli("convert", source, "--store", file_store_url, check=False)
    assert done.returncode == 1, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert message in lines[0]
    assert (source in lines[0] and "layer 2/2 sha256:" in lines[0]) or "unsupported layer media type" in lines[0]
    assert list(open_store(file_store_url).list(IMAGES)) == []


def test_blob_digest_and_size_mismatch(tmp_path, file_store_url):
    blob = gzip.compress(GOOD, mtime=0)
    lying = layout_with(tmp_path, blob, "application/vnd.oci.image.layer.v1.tar+gzip", _sha(GOOD), digest=_sha(b"x"))
    done = run_cli("convert", lying, "--store", file_store_url, check=False)
    assert done.returncode == 1 and "blob digest mismatch" in done.stderr
    short = layout_with(tmp_path / "2", blob, "application/vnd.oci.image.layer.v1.tar+gzip", _sha(GOOD), size=len(blob) + 10)
    done = run_cli("convert", short, "--store", file_store_url, check=False)
    assert done.returncode == 1 and "the manifest says" in done.stderr
    assert list(open_store(file_store_url).list(IMAGES)) == []


def manifest_layout(tmp_path, manifest: bytes) -> str:
    writer = LayoutWriter(tmp_path / "m")
    digest, size = writer.add_blob(manifest)
    writer.tag({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": size}, "m")
    return f"oci:{tmp_path / 'm'}:m"


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        (b"{not json", "not valid JSON"),
        (json.dumps({"schemaVersion": 1, "name": "x", "fsLayers": []}).encode(), "schema 1"),
        (
            json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": {}}).encode(),
            "'layers' is missing",
        ),
        (
            json.dumps({"schemaVersion": 2, "config": {"digest": "sha256:" + "0" * 64, "size": 2}, "layers": []}).encode(),
            "missing from the layout",
        ),
        (b" " * (5 << 20), "byte limit"),
    ],
)
def test_malformed_manifests(tmp_path, file_store_url, manifest, message):
    done = run_cli("convert", manifest_layout(tmp_path, manifest), "--store", file_store_url, check=False)
    assert done.returncode == 1 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_device_nodes_and_odd_symlinks_are_legal(tmp_path, file_store_url):
    layer = make_tar(
        [
            Member("dev", "dir"),
            Member("dev/kmsg", "char", devmajor=1, devminor=11),
            Member("abs", "symlink", linkname="/etc/../../outside"),
            Member("rel", "symlink", linkname="../../../.."),
        ]
    )
    writer = LayoutWriter(tmp_path / "ok")
    writer.tag(writer.add_image([layer]), "ok")
    run_cli("convert", f"oci:{tmp_path / 'ok'}:ok", "--store", file_store_url)
    assert len(list(open_store(file_store_url).list(IMAGES))) == 1


# Hostile sizes and streams: each ends in bounded time and memory with one line, and nothing in the store.

TAR = "application/vnd.oci.image.layer.v1.tar"
TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
PEAK_RSS_LIMIT = 400 << 20  # a small conversion peaks near 100 MB here; the hostile inputs asked for GBs


# Runs `liftoff convert` and, at exit, records this process's own peak RSS (VmHWM of its memory map). The
# kernel's ru_maxrss of a child is no use here: exec() carries over the pre-exec image's high-water mark, which
# is the forked test runner's own (hundreds of MB late in a full run).
_MEASURED = """
import atexit, os, sys
def _peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            with open(os.environ["LIFTOFF_TEST_PEAK_FILE"], "w") as f:
                f.write(line.split()[1])
atexit.register(_peak)
from liftoff.cli import main
sys.exit(main(["convert", *sys.argv[1:]]))
"""


def convert_measured(*args: str, timeout: float = 120) -> tuple[int, str, int]:
    """`liftoff convert ARGS` in a child process: (exit code, stderr, the child's own peak RSS in bytes)."""
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r") as peak:
        env = {**os.environ, "LIFTOFF_TEST_PEAK_FILE": peak.name}
        child = subprocess.Popen(
            [sys.executable, "-c", _MEASURED, *args], stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=env
        )
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        err.seek(0)
        recorded = Path(peak.name).read_text().strip()
        assert recorded, f"the conversion did not exit normally ({child.returncode}): no peak recorded"
        return child.returncode, err.read().decode(), int(recorded) * 1024


def assert_refused(code: int, stderr: str, store_url: str, *needles: str, bad_layer: str | None = None) -> str:
    """Exit 1 with one line holding every needle; no image record in the store, and no index of `bad_layer`
    (default: no layer index at all)."""
    assert code == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    store = open_store(store_url)
    assert list(store.list(IMAGES)) == []
    indexes = list(store.list(LAYERS))
    assert (layer_index_key(bad_layer) not in indexes) if bad_layer else indexes == [], indexes
    return lines[0]


def _special_header(typeflag: bytes, size: int) -> bytes:
    info = tarfile.TarInfo("././@PaxHeader" if typeflag == b"x" else "././@LongLink")
    info.type, info.size = typeflag, size
    return info.tobuf(format=tarfile.USTAR_FORMAT)


@pytest.mark.parametrize(("typeflag", "kind"), [(b"x", "pax extended header"), (b"L", "GNU long name")])
def test_huge_pax_or_long_name_header_is_refused_in_bounded_memory(tmp_path, file_store_url, typeflag, kind):
    """A 1.5 MB layer (1537 gzip members) whose one header declares, and carries, 1.5 GB of metadata."""
    payload = 1536 << 20
    zeros = gzip.compress(bytes(1 << 20), mtime=0)
    before = tarfile.TarInfo("before")
    before.size = 3
    head = before.tobuf(format=tarfile.USTAR_FORMAT) + b"ok\n".ljust(512, b"\0")
    blob = gzip.compress(head + _special_header(typeflag, payload), mtime=0)
    blob += zeros * (payload >> 20)
    assert len(blob) < 3 << 20
    source = layout_with(tmp_path, blob, TAR_GZIP, _sha(b"never reached"))
    code, stderr, peak = convert_measured(source, "--store", file_store_url)
    line = assert_refused(code, stderr, file_store_url, "layer 2/2 sha256:", kind, "1 MiB limit", "@", bad_layer=_sha(blob))
    assert str(payload) in line and "'before'" in line, line
    assert peak < PEAK_RSS_LIMIT, f"peak RSS {peak >> 20} MiB"


def _one_layer_registry(behaviour: str, target: str, **kw) -> tuple[HostileRegistry, dict]:
    registry = HostileRegistry(**kw)
    tar = make_tar([Member("f", data=bytes(range(256)) * 64)])
    digests = registry.add_image("v1", [(tar, TAR, _sha(tar))], sizes={0: 1024} if behaviour == "endless" else None)
    key = {"manifest": "v1", "config": digests["config"], "layer": digests["layers"][0]}[target]
    registry.behaviour[key] = behaviour
    return registry, digests


def test_blob_longer_than_its_descriptor_is_cut_off_after_one_byte_more(file_store_url):
    """The manifest says 1,024 bytes; the registry announces and streams 10 GiB."""
    registry, digests = _one_layer_registry("endless", "layer")
    try:
        started = time.monotonic()
        code, stderr, peak = convert_measured(f"{registry.host}/app:v1", "--plain-http", "--store", file_store_url, timeout=60)
        elapsed = time.monotonic() - started
    finally:
        registry.stop()
    assert_refused(code, stderr, file_store_url, digests["layers"][0], "more than the 1024 bytes", "1025")
    assert elapsed < 30 and registry.sent[digests["layers"][0]] < 64 << 20, (elapsed, registry.sent)
    assert peak < PEAK_RSS_LIMIT


@pytest.mark.parametrize("target", ["manifest", "config", "layer"])
def test_endless_trickle_ends_at_the_fetch_deadline(file_store_url, target):
    """One byte every 50 ms, announcing ten times the real length: --fetch-timeout 1 ends it after a second."""
    registry, digests = _one_layer_registry("trickle", target)
    try:
        started = time.monotonic()
        code, stderr, _ = convert_measured(
            f"{registry.host}/app:v1", "--plain-http", "--fetch-timeout", "1", "--store", file_store_url, timeout=60
        )
        elapsed = time.monotonic() - started
    finally:
        registry.stop()
    named = {"manifest": "manifest app:v1", "config": digests["config"], "layer": digests["layers"][0]}[target]
    line = assert_refused(code, stderr, file_store_url, named, "arrived in", "--fetch-timeout")
    assert elapsed < 20, (elapsed, line)


def test_fetch_deadline_scales_with_size():
    from layerstore.oci.bounded import DEADLINE_FLOOR, fetch_deadline

    assert DEADLINE_FLOOR <= fetch_deadline(1024) < DEADLINE_FLOOR + 1
    assert fetch_deadline(5 << 30) > 4 * 3600  # a 5 GiB layer on a ~2 Mbit/s link still completes
    assert fetch_deadline(5 << 30, 30.0) == 30.0


def test_redirect_to_an_unresolvable_host_names_that_host(file_store_url):
    registry, digests = _one_layer_registry("", "layer")
    layer = digests["layers"][0]
    registry.behaviour[layer] = f"redirect:http://blobs.invalid:9/signed/{layer}"
    try:
        done = run_cli("convert", f"{registry.host}/app:v1", "--plain-http", "--store", file_store_url, check=False, timeout=60)
    finally:
        registry.stop()
    line = assert_refused(done.returncode, done.stderr, file_store_url, "blobs.invalid", "redirect", registry.host, layer)
    assert f"registry {registry.host} is unreachable" not in line


def test_redirect_to_a_working_host_is_followed(file_store_url):
    """A blob sent to another host (a CDN) still converts: redirects are followed by hand now."""
    registry, digests = _one_layer_registry("", "layer")
    cdn = HostileRegistry()
    cdn.blobs.update(registry.blobs)
    layer = digests["layers"][0]
    registry.behaviour[layer] = f"redirect:http://localhost:{cdn.host.split(':')[1]}/v2/cdn/blobs/{layer}"
    try:
        run_cli("convert", f"{registry.host}/app:v1", "--plain-http", "--store", file_store_url, timeout=60)
    finally:
        registry.stop()
        cdn.stop()
    assert cdn.sent[layer] == len(registry.blobs[layer])
    assert list(open_store(file_store_url).list(IMAGES)) != []


@pytest.mark.parametrize("which", ["index.json", "manifest"])
def test_huge_layout_file_is_refused_in_bounded_memory(tmp_path, file_store_url, which):
    """A 2 GiB (sparse) index.json or manifest blob in an OCI layout is not read into memory."""
    writer = LayoutWriter(tmp_path / "big")
    writer.tag(writer.add_image([GOOD]), "v1")
    index = tmp_path / "big" / "index.json"
    if which == "index.json":
        path = index
    else:
        digest = json.loads(index.read_text())["manifests"][0]["digest"]
        path = tmp_path / "big" / "blobs" / "sha256" / digest.split(":")[1]
    with open(path, "r+b") as f:
        f.truncate(2 << 30)
    code, stderr, peak = convert_measured(f"oci:{tmp_path / 'big'}:v1", "--store", file_store_url)
    assert_refused(code, stderr, file_store_url, "byte limit", which if which == "index.json" else "manifest")
    assert peak < PEAK_RSS_LIMIT, f"peak RSS {peak >> 20} MiB"


def test_proxy_names_the_redirect_host_that_failed(tmp_path):
    """The registry proxy's upstream fetch follows the same rule as the converter's client."""
    from tests.proxy.helpers import start_proxy

    registry, digests = _one_layer_registry("", "layer")
    layer = digests["layers"][0]
    registry.behaviour[layer] = f"redirect:http://blobs.invalid:9/signed/{layer}"
    proxy = start_proxy(tmp_path / "proxy", [(registry.host, f"http://{registry.host}")])
    try:
        response = proxy.get(f"/v2/app/blobs/{layer}", ns=registry.host)
    finally:
        proxy.stop()
        registry.stop()
    assert response.status_code == 502, response.text
    message = response.json()["errors"][0]["message"]
    assert "blobs.invalid" in message and f"upstream {registry.host} redirected blob" in message, message
