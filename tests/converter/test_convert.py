"""liftoff convert end to end: OCI layouts and a real registry into file:// and s3:// stores."""

from __future__ import annotations

import json

import pytest

from layerstore.catalog import find_image, load_index
from layerstore.errors import FormatError
from layerstore.index import FORMAT_MAJOR, decode_index, decompress_chunk, encode_index
from layerstore.layout import IMAGES, chunk_key, layer_index_key
from layerstore.records import ImageRecord
from layerstore.stores import StoreChain, open_store
from liftoff.devstack.ocibuild import LayoutWriter, Member, make_tar
from liftoff.devstack.services import push_layout
from tests.conftest import run_cli
from tests.converter.images import CHUNK, kitchen_sink_layers, many_files_layer, oracle_entries, stored_entries


@pytest.fixture(scope="module")
def sink_layout(tmp_path_factory):
    """The kitchen-sink image: a gzip layer and a zstd layer, tagged v1."""
    root = tmp_path_factory.mktemp("sink")
    layers = kitchen_sink_layers()
    writer = LayoutWriter(root)
    writer.tag(writer.add_image(layers, compression=["gzip", "zstd"], config={"Cmd": ["/bin/tool"]}), "v1")
    return root, layers


def convert_json(source: str, *stores: str, extra: tuple[str, ...] = ()) -> dict:
    args = ["convert", source, "--json", "--chunk-size", str(CHUNK), *extra]
    for store in stores:
        args += ["--store", store]
    return json.loads(run_cli(*args).stdout)


def rebuilt_layers(store_url: str, digest: str) -> list[list[dict]]:
    chain = StoreChain([open_store(store_url)])
    _, record = find_image(chain, digest)
    assert isinstance(record, ImageRecord)
    out = []
    for layer in record.layers:
        index = load_index(chain, layer.digest)

        def chunk(i, index=index):
            c = index.chunks[i]
            return decompress_chunk(chain.get(chunk_key(c.sha256)), c.sha256, c.size, "test")

        out.append(stored_entries(index, chunk))
    return out


@pytest.mark.parametrize("store_kind", ["file", "s3"])
def test_round_trip_is_exact(store_kind, sink_layout, request):
    store = request.getfixturevalue("file_store_url" if store_kind == "file" else "s3_store_url")
    root, layers = sink_layout
    summary = convert_json(f"oci:{root}:v1", store)
    assert summary["chunks_new"] > 0 and summary["bytes_uploaded"] > 0
    assert summary["files"] == sum(len(oracle_entries(t)) for t in layers)
    assert summary["bytes_in"] == sum(len(t) for t in layers)
    rebuilt = rebuilt_layers(store, summary["manifest_digest"])
    assert rebuilt == [oracle_entries(t) for t in layers]
    out = run_cli("verify", summary["manifest_digest"], "--store", store, "--source", f"oci:{root}:v1")
    assert "verified" in out.stdout


def test_summary_and_second_convert_uploads_nothing(sink_layout, file_store_url):
    root, _ = sink_layout
    first = convert_json(f"oci:{root}:v1", file_store_url)
    image = first["images"][0]
    assert [layer["already_converted"] for layer in image["layers"]] == [False, False]
    assert all(layer["chain_id"].startswith("sha256:") for layer in image["layers"])
    assert image["layers"][0]["chain_id"] == image["layers"][0]["diff_id"]
    # identical content across the two layers (data/one-chunk-again) is stored once
    assert first["chunks_new"] < first["chunks_total"] and first["dedupe_ratio"] > 0
    second = convert_json(f"oci:{root}:v1", file_store_url)
    assert second["bytes_uploaded"] == 0 and second["chunks_new"] == 0
    assert [layer["already_converted"] for layer in second["images"][0]["layers"]] == [True, True]
    assert second["images"][0]["record_written"] is False
    assert second["seconds"] < max(first["seconds"], 0.05)


def test_shared_layers_upload_only_new_chunks(tmp_path, file_store_url):
    base = many_files_layer(300)
    writer = LayoutWriter(tmp_path / "layout")
    app1 = make_tar([Member("srv", "dir"), Member("srv/app.py", data=b"print('one')\n")])
    app2 = make_tar([Member("srv", "dir"), Member("srv/app.py", data=b"print('two')\n")])
    writer.tag(writer.add_image([base, app1]), "one")
    writer.tag(writer.add_image([base, app2]), "two")
    one = convert_json(f"oci:{tmp_path / 'layout'}:one", file_store_url)
    two = convert_json(f"oci:{tmp_path / 'layout'}:two", file_store_url)
    assert two["images"][0]["layers"][0]["already_converted"] is True
    assert two["chunks_new"] == 1 and two["chunks_new"] < one["chunks_new"]
    # a different compression of the same tar is a different blob but the same chunks
    writer.tag(writer.add_image([base], compression="zstd"), "three")
    three = convert_json(f"oci:{tmp_path / 'layout'}:three", file_store_url)
    assert three["images"][0]["layers"][0]["already_converted"] is False
    assert three["chunks_new"] == 0 and three["chunks_total"] > 0


def test_several_stores_each_complete(sink_layout, tmp_path, s3_store_url):
    root, layers = sink_layout
    file_a = f"file://{tmp_path / 'a'}"
    summary = convert_json(f"oci:{root}:v1", file_a, s3_store_url)
    for store in (file_a, s3_store_url):
        assert rebuilt_layers(store, summary["manifest_digest"]) == [oracle_entries(t) for t in layers]
        run_cli("verify", summary["manifest_digest"], "--store", store)


def test_registry_source_docker_media_types_and_plain_layers(registry, tmp_path, file_store_url):
    layers = [many_files_layer(200), kitchen_sink_layers()[0]]
    writer = LayoutWriter(tmp_path / "layout")
    writer.tag(writer.add_image(layers, compression=["gzip", "none"]), "dock")
    ref = push_layout(tmp_path / "layout", "dock", registry.host, "test/docker-types", docker_format=True)
    summary = convert_json(ref, file_store_url, extra=("--plain-http",))
    assert rebuilt_layers(file_store_url, summary["manifest_digest"]) == [oracle_entries(t) for t in layers]
    # by digest, and found by its reference in ls/inspect
    by_digest = convert_json(
        f"{registry.host}/test/docker-types@{summary['manifest_digest']}", file_store_url, extra=("--plain-http",)
    )
    assert by_digest["bytes_uploaded"] == 0
    listing = json.loads(run_cli("ls", "--store", file_store_url, "--json").stdout)
    assert [row["references"] for row in listing] == [[ref]]
    info = json.loads(run_cli("inspect", ref, "--store", file_store_url, "--json").stdout)
    assert [layer["entries"] for layer in info["images"][0]["layers"]] == [len(oracle_entries(t)) for t in layers]


def test_multi_platform_index(registry, tmp_path, file_store_url):
    writer = LayoutWriter(tmp_path / "layout")
    amd = writer.add_image([make_tar([Member("arch", data=b"amd64\n")])], platform=("linux", "amd64"))
    arm = writer.add_image([make_tar([Member("arch", data=b"arm64\n")])], platform=("linux", "arm64"))
    writer.tag(writer.add_index([amd, arm]), "multi")
    ref = push_layout(tmp_path / "layout", "multi", registry.host, "test/multi")
    only_arm = convert_json(ref, file_store_url, extra=("--plain-http", "--platform", "linux/arm64"))
    assert [i["platform"]["architecture"] for i in only_arm["images"]] == ["arm64"]
    both = convert_json(ref, file_store_url, extra=("--plain-http",))
    assert sorted(i["platform"]["architecture"] for i in both["images"]) == ["amd64", "arm64"]
    store = open_store(file_store_url)
    assert len(list(store.list(IMAGES))) == 3  # two images and the index
    listing = json.loads(run_cli("ls", "--store", file_store_url, "--json").stdout)
    assert sorted(row["kind"] for row in listing) == ["image", "image", "index"]
    missing = run_cli("convert", ref, "--plain-http", "--store", file_store_url, "--platform", "linux/s390x", check=False)
    assert missing.returncode != 0 and "no manifest for platform linux/s390x" in missing.stderr


def test_index_versions_and_damage_are_reported(sink_layout, file_store_url):
    root, _ = sink_layout
    summary = convert_json(f"oci:{root}:v1", file_store_url)
    store = open_store(file_store_url)
    layer = summary["images"][0]["layers"][0]["digest"]
    key = layer_index_key(layer)
    good = store.get(key)
    index = decode_index(good)
    index.format_major = FORMAT_MAJOR + 1
    with pytest.raises(FormatError, match=r"index format 2\.0 is not supported"):
        decode_index(encode_index(index))
    with pytest.raises(FormatError, match="corrupt or truncated index"):
        decode_index(good[: len(good) // 2])
    # a corrupt chunk is named by verify
    chunk = chunk_key(index.chunks[0].sha256)
    store.put(chunk, store.get(chunk)[:-3] + b"xyz")
    done = run_cli("verify", summary["manifest_digest"], "--store", file_store_url, check=False)
    assert done.returncode == 4 and index.chunks[0].sha256.hex() in done.stderr  # 4: verification failed
    assert done.stderr.strip().splitlines()[-1].startswith("liftoff: error: verify found 1 problem(s)")
    done = run_cli("verify", summary["manifest_digest"], "--store", file_store_url, "--json", check=False)
    error = json.loads(done.stdout)["error"]
    assert done.returncode == 4 and (error["code"], error["exit"]) == ("verification_failed", 4)
    assert any(index.chunks[0].sha256.hex() in problem for problem in error["problems"])
