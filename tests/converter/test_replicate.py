"""liftoff replicate: another region's store gets what it lacks, in write order, idempotently."""

from __future__ import annotations

import json

import pytest

from layerstore.layout import CHUNKS, IMAGES
from layerstore.stores import open_store
from liftoff.devstack.ocibuild import LayoutWriter, Member, make_tar
from tests.conftest import run_cli
from tests.converter.images import CHUNK, kitchen_sink_layers, many_files_layer


@pytest.fixture(scope="module")
def two_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("rep")
    writer = LayoutWriter(root)
    base = many_files_layer(300)
    writer.tag(writer.add_image([base, kitchen_sink_layers()[0]]), "a")
    writer.tag(writer.add_image([base, make_tar([Member("b", data=b"b\n")])]), "b")
    return root


def convert(source, store):
    return json.loads(run_cli("convert", source, "--store", store, "--json", "--chunk-size", str(CHUNK)).stdout)


def replicate(*args):
    return json.loads(run_cli("replicate", *args, "--json").stdout)


def test_file_to_s3_and_back(two_images, tmp_path, s3_store_url):
    home = f"file://{tmp_path / 'home'}"
    a = convert(f"oci:{two_images}:a", home)
    convert(f"oci:{two_images}:b", home)
    first = replicate("--from", home, "--to", s3_store_url, a["manifest_digest"])
    assert first["images"] == 1 and first["chunks_copied"] > 0 and first["layers_copied"] == 2
    run_cli("verify", a["manifest_digest"], "--store", s3_store_url)
    # the second image shares the base layer: only its own layer moves
    rest = replicate("--from", home, "--to", s3_store_url, "--all")
    assert rest["layers_present"] >= 3 and rest["layers_copied"] == 1
    again = replicate("--from", home, "--to", s3_store_url, "--all")
    assert again["layers_copied"] == 0 and again["chunks_copied"] == 0 and again["bytes_copied"] == 0
    back = f"file://{tmp_path / 'back'}"
    replicate("--from", s3_store_url, "--to", back, "--all")
    assert sorted(open_store(back).list(IMAGES)) == sorted(open_store(home).list(IMAGES))
    assert sorted(open_store(back).list(CHUNKS)) == sorted(open_store(home).list(CHUNKS))


def test_s3_to_s3_is_a_server_side_copy(two_images, s3_server):
    s3_server.create_bucket("region-east")
    s3_server.create_bucket("region-west")
    east = "s3://region-east/liftoff?path_style=true"
    west = "s3://region-west/liftoff?path_style=true"
    a = convert(f"oci:{two_images}:a", east)
    stats = replicate("--from", east, "--to", west, "--all")
    assert stats["chunks_copied"] > 0 and stats["bytes_copied"] == 0  # nothing went through this machine
    run_cli("verify", a["manifest_digest"], "--store", west)


def test_replicate_needs_names_or_all(tmp_path):
    done = run_cli("replicate", "--from", f"file://{tmp_path}", "--to", f"file://{tmp_path}/x", check=False)
    assert done.returncode == 1 and "--all" in done.stderr
