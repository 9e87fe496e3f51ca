"""The one OCI model (layerstore.oci.manifest, .platform, .auth): every rule, including where the old copies disagreed."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import aiohttp
import pytest

from converter.image import convert_image
from layerstore.errors import FormatError, ImageError, LiftoffError, RegistryError
from layerstore.jsondoc import load_json
from layerstore.oci import mediatypes
from layerstore.oci.auth import (
    DockerCredentials,
    TokenCache,
    basic_header,
    parse_basic,
    parse_challenge,
    token_from_response,
)
from layerstore.oci.manifest import (
    MAX_INDEX_DEPTH,
    Index,
    Manifest,
    Node,
    image_layers,
    parse_config,
    parse_document,
    select_manifests,
    sniff_media_type,
)
from layerstore.oci.platform import Platform, host_platform, normalize, parse_platform, platform_from_json
from layerstore.oci.reference import parse_reference
from layerstore.oci.registry import RegistryClient
from layerstore.oci.source import LayoutSource
from layerstore.retry import Backoff
from layerstore.stores import open_store
from liftoff.devstack.ocibuild import LayoutWriter, Member, make_tar

D = "sha256:" + "a" * 64
E = "sha256:" + "b" * 64
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
FAST = Backoff(base=0.001, cap=0.002)


def desc(media_type: str = LAYER, digest: str = D, size: object = 10, **extra) -> dict:
    found = {"mediaType": media_type, "digest": digest, "size": size, **extra}
    return {k: v for k, v in found.items() if v is not None}


def manifest(layers: list | None = None, config: object = None, media_type: str | None = mediatypes.OCI_MANIFEST) -> bytes:
    doc = {
        "schemaVersion": 2,
        "config": config if config is not None else desc(mediatypes.OCI_CONFIG, E, 2),
        "layers": layers if layers is not None else [desc()],
    }
    if media_type:
        doc["mediaType"] = media_type
    return json.dumps(doc).encode()


def index(children: list, media_type: str = mediatypes.OCI_INDEX) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": media_type, "manifests": children}).encode()


# Documents


def test_manifests_and_indexes_parse_to_typed_values():
    parsed = parse_document(manifest(), None, "img")
    assert isinstance(parsed, Manifest) and parsed.media_type == mediatypes.OCI_MANIFEST
    assert parsed.config.digest == E and parsed.config.size == 2 and parsed.layers[0].size == 10
    docker = parse_document(manifest(media_type=mediatypes.DOCKER_MANIFEST), None, "img")
    assert isinstance(docker, Manifest) and docker.media_type == mediatypes.DOCKER_MANIFEST
    arm = desc(mediatypes.DOCKER_MANIFEST, platform={"os": "linux", "architecture": "aarch64", "variant": "8"})
    listed = parse_document(index([arm], mediatypes.DOCKER_LIST), None, "img")
    assert isinstance(listed, Index) and listed.manifests[0].platform == Platform("linux", "arm64")
    annotated = parse_document(index([desc(mediatypes.OCI_MANIFEST, annotations={"a": "b"})]), None, "img")
    assert annotated.manifests[0].annotations == {"a": "b"}


@pytest.mark.parametrize("size", [None, -1, "10", 1.5, True])
@pytest.mark.parametrize("where", ["layer", "config", "index entry"])
def test_a_descriptor_without_a_valid_size_is_refused_everywhere(size, where):
    # The converter refused a layer without a size; the pull read the config whatever its size, and an index entry's
    # size was never looked at. Now every descriptor needs an integer size >= 0.
    bad = desc(size=size)
    body = {
        "layer": manifest([bad]),
        "config": manifest(config=desc(mediatypes.OCI_CONFIG, size=size)),
        "index entry": index([desc(mediatypes.OCI_MANIFEST, size=size)]),
    }[where]
    with pytest.raises(ImageError, match="no valid size"):
        parse_document(body, None, "img")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (manifest([desc(digest="sha256:xyz")]), "invalid img: layer 1 digest"),
        (manifest([desc(digest=None)]), "digest"),
        (manifest(["not an object"]), "layer 1 is not a descriptor object"),
        (index(["x"]), "manifest 1 is not a descriptor object"),
        (manifest([desc(annotations={"a": 1})]), "annotations"),
        (index([desc(mediatypes.OCI_MANIFEST, platform={"os": "linux"})]), "platform needs"),
        (index([desc(mediatypes.OCI_MANIFEST, platform="linux/amd64")]), "platform is not an object"),
        (manifest([desc(media_type=5)]), "mediaType that is not a string"),
        (json.dumps({"schemaVersion": 2, "mediaType": mediatypes.OCI_MANIFEST, "layers": []}).encode(), "no config"),
        (json.dumps({"schemaVersion": 2, "mediaType": mediatypes.OCI_INDEX}).encode(), "'manifests' is missing"),
        (json.dumps({"schemaVersion": 1, "fsLayers": []}).encode(), "schema 1"),
        (json.dumps({"schemaVersion": 3, "mediaType": mediatypes.OCI_MANIFEST}).encode(), "schemaVersion 3"),
        (b"[1]", "not a JSON object"),
        (b"{nope", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b" " * (mediatypes.MAX_MANIFEST_BYTES + 1), "byte limit"),
    ],
)
def test_malformed_documents_are_one_image_error(body, message):
    with pytest.raises(ImageError, match="img") as caught:
        parse_document(body, None, "img")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_media_type_is_the_documents_own_then_the_declared_then_the_shape():
    # An unknown mediaType in the document was guessed from its shape before; now it is refused.
    with pytest.raises(ImageError, match=r"unsupported manifest media type .application/vnd\.example"):
        parse_document(manifest(media_type="application/vnd.example+json"), None, "img")
    # No mediaType in the body: a specific declared type decides; an unknown one is refused.
    untyped = manifest(media_type=None)
    assert parse_document(untyped, mediatypes.DOCKER_MANIFEST, "img").media_type == mediatypes.DOCKER_MANIFEST
    with pytest.raises(ImageError, match="unsupported manifest media type"):
        parse_document(untyped, "application/vnd.example+json", "img")
    # Generic or absent declared types: the shape decides.
    assert parse_document(untyped, "application/json", "img").media_type == mediatypes.OCI_MANIFEST
    untyped_index = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
    assert isinstance(parse_document(untyped_index, "", "img"), Index)
    # Docker schema 1 declared by the registry.
    with pytest.raises(ImageError, match="schema 1"):
        parse_document(json.dumps({"schemaVersion": 2, "layers": []}).encode(), mediatypes.DOCKER_SCHEMA1[1], "img")


def test_sniffing_a_served_manifest_never_raises():
    assert sniff_media_type(manifest(), "application/json") == mediatypes.OCI_MANIFEST
    assert sniff_media_type(manifest(), f"{mediatypes.DOCKER_MANIFEST}; charset=utf-8") == mediatypes.DOCKER_MANIFEST
    assert sniff_media_type(json.dumps({"manifests": []}).encode(), "") == mediatypes.OCI_INDEX
    assert sniff_media_type(b"[" * 100_000, "") == "application/octet-stream"  # was a RecursionError in the proxy
    assert sniff_media_type(b"{}", "text/plain") == "text/plain"


def test_json_helper_names_the_document():
    with pytest.raises(FormatError, match=r"^tags: JSON nested too deeply"):
        load_json(b"[" * 100_000, "tags")
    with pytest.raises(RegistryError, match=r"^token: not valid JSON"):
        load_json(b"\xff", "token", RegistryError)
    assert load_json(b'{"a": [1]}', "x") == {"a": [1]}


def test_config_and_layers():
    body = manifest([desc(), desc(media_type="application/vnd.oci.image.layer.v1.tar+zstd", digest=E)])
    doc = parse_document(body, None, "img")
    config = parse_config(json.dumps({"os": "linux", "rootfs": {"diff_ids": [D, E]}}).encode(), "img")
    layers = image_layers(doc, config, "img")
    assert [x.compression for x in layers] == ["gzip", "zstd"] and layers[0].chain_id == D and layers[1].chain_id != E
    with pytest.raises(ImageError, match="config lists 1 diff_ids but the manifest has 2 layers"):
        image_layers(doc, {"rootfs": {"diff_ids": [D]}}, "img")
    with pytest.raises(ImageError, match="layer 2 diff_id"):
        image_layers(doc, {"rootfs": {"diff_ids": [D, "x"]}}, "img")
    foreign = parse_document(manifest([desc(media_type="application/x-foo")]), None, "img")
    with pytest.raises(ImageError, match=r"layer 1/1 .*unsupported layer media type"):
        image_layers(foreign, {"rootfs": {"diff_ids": [D]}}, "img")
    for bad in (b"[]", b'{"rootfs": {}}', b"{nope"):
        with pytest.raises(ImageError, match="img"):
            parse_config(bad, "img")


# Platforms


def test_platform_normalisation_follows_containerd():
    assert normalize("linux", "x86_64") == Platform("linux", "amd64")
    assert normalize("linux", "x86-64", "v1") == Platform("linux", "amd64")
    assert normalize("linux", "aarch64", "v8") == Platform("linux", "arm64")
    assert normalize("linux", "arm64", "8") == Platform("linux", "arm64")
    assert normalize("linux", "arm64", "v9") == Platform("linux", "arm64", "v9")
    assert normalize("linux", "armhf") == Platform("linux", "arm", "v7")
    assert normalize("linux", "armel") == Platform("linux", "arm", "v6")
    assert normalize("linux", "arm") == Platform("linux", "arm", "v7")
    assert normalize("linux", "arm", "6") == Platform("linux", "arm", "v6")
    assert normalize("Linux", "i386") == Platform("linux", "386")
    assert str(parse_platform("linux/arm64/v8")) == "linux/arm64" and str(parse_platform("linux/arm/7")) == "linux/arm/v7"


def test_platform_matching():
    amd64 = platform_from_json({"os": "linux", "architecture": "x86_64"}, "t")
    arm_v6 = normalize("linux", "arm", "v6")
    assert parse_platform("linux/amd64").matches(amd64)
    assert parse_platform("linux/arm").matches(arm_v6) and not parse_platform("linux/arm/v7").matches(arm_v6)
    assert not parse_platform("linux/arm64").matches(amd64)
    assert not parse_platform("unknown/unknown").matches(Platform("unknown", "unknown"))  # attestations never
    assert not parse_platform("linux/amd64").matches(None)
    for bad in ("linux", "linux/", "a/b/c/d", ""):
        with pytest.raises(LiftoffError, match="invalid platform"):
            parse_platform(bad)


def test_host_platform_is_normalised():
    import platform

    assert host_platform() == normalize("linux", platform.machine()) or host_platform().architecture == "arm"
    assert host_platform().architecture in ("amd64", "arm64", "arm", "386", "ppc64le", "s390x", "riscv64")


# Walking indexes


class Blobs:
    """Manifests by digest, and which were fetched."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.fetched: list[str] = []

    def add(self, body: bytes, media_type: str, platform: dict | None = None) -> dict:
        import hashlib

        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        self.blobs[digest] = body
        return desc(media_type, digest, len(body), platform=platform)

    def fetch(self, child) -> tuple[str, bytes]:
        self.fetched.append(child.digest)
        return "", self.blobs[child.digest]


def top(body: bytes) -> Node:
    return Node("sha256:" + "c" * 64, body, parse_document(body, None, "img"))


AMD64 = {"os": "linux", "architecture": "amd64"}
ARM64 = {"os": "linux", "architecture": "arm64", "variant": "v8"}


def test_nested_indexes_are_followed_with_a_depth_bound():
    # The converter refused nested indexes while the pull followed them 3 deep: now both follow, MAX_INDEX_DEPTH deep.
    blobs = Blobs()
    amd = blobs.add(manifest(), mediatypes.OCI_MANIFEST, AMD64)
    arm = blobs.add(manifest([desc(digest=E)]), mediatypes.OCI_MANIFEST, ARM64)
    inner = blobs.add(index([amd, arm]), mediatypes.OCI_INDEX)
    paths = select_manifests(top(index([inner])), blobs.fetch, [parse_platform("linux/arm64")], "img")
    assert [[n.digest for n in p][1:] for p in paths] == [[inner["digest"], arm["digest"]]]
    everything = select_manifests(top(index([inner])), blobs.fetch, None, "img")
    assert [p[-1].digest for p in everything] == [amd["digest"], arm["digest"]]
    nested = amd
    for _ in range(MAX_INDEX_DEPTH - 1):
        nested = blobs.add(index([nested]), mediatypes.OCI_INDEX)
    assert select_manifests(top(index([nested])), blobs.fetch, None, "img")[0][-1].digest == amd["digest"]
    deeper = blobs.add(index([nested]), mediatypes.OCI_INDEX)
    with pytest.raises(ImageError, match=f"nested more than {MAX_INDEX_DEPTH} deep"):
        select_manifests(top(index([deeper])), blobs.fetch, None, "img")


def test_selection_rules():
    blobs = Blobs()
    attestation = blobs.add(manifest(), mediatypes.OCI_MANIFEST, {"os": "unknown", "architecture": "unknown"})
    amd = blobs.add(manifest([desc(digest=E)]), mediatypes.OCI_MANIFEST, {"os": "linux", "architecture": "x86_64"})
    arm = blobs.add(manifest([desc(digest=E), desc()]), mediatypes.OCI_MANIFEST, ARM64)
    body = index([attestation, amd, arm])
    assert [p[-1].digest for p in select_manifests(top(body), blobs.fetch, None, "img")] == [amd["digest"], arm["digest"]]
    blobs.fetched.clear()
    first = select_manifests(
        top(body), blobs.fetch, [parse_platform("linux/amd64"), parse_platform("linux/arm64")], "img", first=True
    )
    assert [p[-1].digest for p in first] == [amd["digest"]] and blobs.fetched == [amd["digest"]]
    with pytest.raises(
        ImageError, match=r"no manifest for platform linux/s390x \(the index has linux/amd64, linux/arm64, unknown/unknown\)"
    ):
        select_manifests(top(body), blobs.fetch, [parse_platform("linux/s390x")], "img")


def test_a_child_must_have_its_descriptors_size():
    blobs = Blobs()
    child = blobs.add(manifest(), mediatypes.OCI_MANIFEST, AMD64)
    child["size"] += 1
    with pytest.raises(ImageError, match="bytes but its descriptor says"):
        select_manifests(top(index([child])), blobs.fetch, None, "img")


def test_convert_follows_a_nested_index(tmp_path):
    # Before, `liftoff convert` refused this image ("nested image indexes are not supported") while `liftoff pull` took it.
    writer = LayoutWriter(tmp_path / "layout")
    amd = writer.add_image([make_tar([Member("amd", data=b"1")])])
    arm = writer.add_image([make_tar([Member("arm", data=b"2")])], platform=("linux", "arm64"))
    inner = writer.add_index([amd, arm])
    writer.tag(writer.add_index([inner]), "v1")
    store = open_store(f"file://{tmp_path / 'store'}")
    from converter.image import ConvertOptions

    result = convert_image(LayoutSource(f"oci:{tmp_path / 'layout'}:v1"), [store], ConvertOptions(platforms=["linux/arm64"]))
    assert [image.manifest_digest for image in result.images] == [arm["digest"]]
    assert result.images[0].platform == {"os": "linux", "architecture": "arm64"}


# The token flow


def test_challenges():
    bearer = parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push"'
    )
    assert bearer is not None and bearer.scheme == "bearer" and bearer.realm == "https://auth.example/token"
    assert bearer.token_query("repository:x:pull") == {"scope": "repository:a/b:pull,push", "service": "registry.example"}
    bare = parse_challenge('bearer realm=https://auth.example/t, error="insufficient_scope"')
    assert bare is not None and bare.realm == "https://auth.example/t" and bare.token_query("s") == {"scope": "s"}
    escaped = parse_challenge(r'Basic realm="say \"hi\""')
    assert escaped is not None and escaped.scheme == "basic" and escaped.realm == 'say "hi"'
    assert parse_challenge("") is None and parse_challenge("   ") is None


def test_tokens_and_basic_headers():
    assert token_from_response({"token": "t", "expires_in": 300}) == ("Bearer t", 300.0)
    assert token_from_response({"access_token": "u"}) == ("Bearer u", 60.0)
    assert token_from_response({"token": "t", "expires_in": True}) == ("Bearer t", 60.0)
    assert token_from_response({"token": ""}) is None and token_from_response([]) is None
    assert parse_basic(basic_header("me", "p:w")) == ("me", "p:w")
    assert parse_basic("Basic !!!") is None and parse_basic("Bearer x") is None


def test_token_cache_expires_and_keeps_identities_apart():
    cache = TokenCache()
    cache.put("a", "scope", "Bearer 1", 300)
    cache.put("b", "scope", "Bearer 2", 5)  # shorter than the renewal margin: kept a second
    assert cache.get("a", "scope") == "Bearer 1" and cache.get("b", "scope") == "Bearer 2"
    assert cache.get("a", "other") is None and cache.get("c", "scope") is None


def test_credentials_by_alias(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {"mirror.example:5000": {"auth": "dTpw"}}}))
    creds = DockerCredentials(config)
    assert creds.lookup("docker.io") is None
    assert creds.lookup("docker.io", "mirror.example:5000") == ("u", "p")


class Flaky(BaseHTTPRequestHandler):
    """A registry and token service that fail each path's first `failures` requests with `status`."""

    failures = 2
    status = 503
    seen: dict[str, int] = {}

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        count = self.seen[path] = self.seen.get(path, 0) + 1
        if count <= self.failures:
            self.send_response(self.status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path == "/token":
            body = json.dumps({"token": "good"}).encode()
        elif self.headers.get("Authorization") != "Bearer good":
            self.send_response(401)
            realm = f"http://127.0.0.1:{self.server.server_address[1]}/token"
            self.send_header("WWW-Authenticate", f'Bearer realm="{realm}",service="flaky"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        else:
            body = manifest()
        self.send_response(200)
        self.send_header("Content-Type", mediatypes.OCI_MANIFEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def flaky():
    Flaky.seen = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, Flaky.seen
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("status", [503, 429])
def test_sync_client_retries_throttling_and_server_errors(flaky, tmp_path, status):
    # The client retried only a 401 before: one 503 from the registry or its token service failed the conversion.
    server, seen = flaky
    Flaky.status = status
    host = f"127.0.0.1:{server.server_address[1]}"
    ref = parse_reference(f"{host}/app:v1")
    client = RegistryClient(host, plain_http=True, credentials=DockerCredentials(tmp_path / "none.json"), backoff=FAST)
    try:
        media_type, body, _ = client.get_manifest(ref)
    finally:
        client.close()
    assert media_type == mediatypes.OCI_MANIFEST and body == manifest()
    assert seen["/token"] == 3 and seen["/v2/app/manifests/v1"] == 4  # 2 failures, a 401, the answer


def test_sync_client_gives_up_after_its_attempts(flaky, tmp_path):
    server, seen = flaky
    Flaky.status, Flaky.failures = 503, 100
    host = f"127.0.0.1:{server.server_address[1]}"
    client = RegistryClient(host, plain_http=True, credentials=DockerCredentials(tmp_path / "none.json"), backoff=FAST)
    try:
        with pytest.raises(RegistryError, match="answered 503"):
            client.get_manifest(parse_reference(f"{host}/app:v1"))
    finally:
        client.close()
        Flaky.failures = 2
    assert seen["/v2/app/manifests/v1"] == 4


def test_sync_client_retries_a_refused_connection(tmp_path):
    client = RegistryClient("127.0.0.1:9", plain_http=True, credentials=DockerCredentials(tmp_path / "n.json"), backoff=FAST)
    with pytest.raises(RegistryError, match="unreachable"):
        client.get_manifest(parse_reference("127.0.0.1:9/app:v1"))


def test_proxy_token_requests_are_retried(flaky, tmp_path):
    from registry_proxy.auth import UpstreamAuth
    from registry_proxy.config import Upstream

    server, seen = flaky
    Flaky.status = 503
    url = f"http://127.0.0.1:{server.server_address[1]}"
    challenge = f'Bearer realm="{url}/token",service="flaky"'

    async def run() -> str | None:
        async with aiohttp.ClientSession() as session:
            auth = UpstreamAuth(Upstream("flaky", url), DockerCredentials(tmp_path / "n.json"), session, 10.0, FAST)
            header = await auth.authorize(challenge, "repository:app:pull", "configured", None, None)
            assert auth.cached("configured", "repository:app:pull", None) == header
            return header

    assert asyncio.run(run()) == "Bearer good"
    assert seen["/token"] == 3
