"""Bad images: a one-line error naming image, layer and cause; no image record is ever written."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile

import pytest

from layerstore.layout import IMAGES
from layerstore.oci.builder import LayoutWriter, Member, make_tar
from layerstore.stores import open_store
from tests.conftest import run_cli


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
