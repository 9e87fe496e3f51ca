"""s3:// URLs and the S3 store's retry policy (layerstore/s3url.py), against a real S3 server (moto) and a real
fault-injecting proxy."""

from __future__ import annotations

import http.server
import ipaddress
import os
import re
import socket
import ssl
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import weightstream
from layerstore import s3url
from layerstore.errors import StoreError
from layerstore.retry import STALL_ATTEMPTS
from layerstore.s3url import S3Location, S3URLError
from layerstore.stores import open_store
from layerstore.stores.presigned import PresignedGetter
from layerstore.stores.s3 import S3Store
from liftoff.devstack.services import start_nginx
from tests.faultproxy import FaultProxy
from tests.silent_server import SilentServer


def test_parse_reads_every_option_and_the_url_wins_over_the_defaults():
    url = "s3://my-bucket/a/b/?endpoint_url=http://127.0.0.1:9000&region=eu-west-1&path_style=TRUE"
    assert s3url.parse(url, region="us-east-1", path_style=False) == S3Location(
        "my-bucket", "a/b/", "http://127.0.0.1:9000", "eu-west-1", True
    )
    plain = s3url.parse("s3://bucket.with.dots//deep/prefix", endpoint_url="https://s3.example:8443", path_style=True)
    assert plain == S3Location("bucket.with.dots", "deep/prefix", "https://s3.example:8443", None, True)
    assert plain.prefix == "deep/prefix/" and plain.url == "s3://bucket.with.dots/deep/prefix/"
    assert s3url.parse("s3://bkt").prefix == "" and s3url.parse("s3://bkt?path_style=off").path_style is False


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("s3:///prefix", "has no bucket"),
        ("s3://ab/p", "not a valid bucket name"),
        ("s3://-bucket/p", "not a valid bucket name"),
        ("s3://bucket-/p", "not a valid bucket name"),
        ("s3://my bucket/p", "not a valid bucket name"),
        ("s3://user:secret@bucket/p", "not a valid bucket name"),
        ("s3://bucket:9000/p", "not a valid bucket name"),
        ("s3://bucket..x/p", "not a valid bucket name"),
        ("s3://" + "b" * 256 + "/p", "not a valid bucket name"),
        ("s3://bucket/p#frag", "has a fragment"),
        ("s3://bucket/p?endpoint=http://x", "unknown option 'endpoint' (known: endpoint_url, region, path_style)"),
        ("s3://bucket/p?region=", "option region has no value"),
        ("s3://bucket/p?region=a&region=b", "given twice"),
        ("s3://bucket/p?path_style=ture", "path_style='ture' is neither true nor false"),
        ("s3://bucket/p?endpoint_url=127.0.0.1:9000", "is not an http(s)://host[:port] URL"),
        ("s3://bucket/p?region=us_east/1", "is not a region name"),
        ("http://bucket/p", "is not an s3:// URL"),
    ],
)
def test_bad_urls_are_refused_with_one_line_naming_the_problem(url, complaint):
    with pytest.raises(S3URLError) as error:
        s3url.parse(url)
    assert complaint in str(error.value) and "\n" not in str(error.value)
    if url.startswith("s3:"):  # both users refuse them the same way, before any network call
        with pytest.raises(StoreError, match=re.escape(complaint)):
            open_store(url)
        with pytest.raises(ValueError, match=re.escape(complaint)):
            weightstream.open(url)


@pytest.fixture
def proxied_store(s3_server):
    """An S3Store on a fresh bucket, reached through a fault proxy that can fail any request."""
    bucket = f"liftoff-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(bucket)
    upstream = urlsplit(s3_server.endpoint)
    proxy = FaultProxy((upstream.hostname, upstream.port), stall_seconds=2.0)
    store = S3Store(
        s3url.parse(f"s3://{bucket}/p?endpoint_url={proxy.endpoint}&path_style=true"), read_timeout=1.0, connect_timeout=1.0
    )
    direct = open_store(f"s3://{bucket}/p?endpoint_url={s3_server.endpoint}&path_style=true")  # writes (the relay
    yield store, proxy, direct  # does not answer "Expect: 100-continue")
    direct.close()
    store.close()
    proxy.stop()


@pytest.mark.parametrize("fault", ["503", "500", "reset", "truncate", "stall"])
def test_the_store_retries_each_transient_fault(proxied_store, fault):
    """botocore makes one attempt; the store retries, a broken body included (botocore never retried those)."""
    store, proxy, direct = proxied_store
    data = os.urandom(200_000)
    direct.put("chunks/x", data)
    proxy.inject(fault)
    assert store.get("chunks/x") == data
    assert proxy.injected == [fault]


def test_a_listing_retries_one_page_not_the_whole_listing(proxied_store):
    store, proxy, direct = proxied_store
    keys = [f"k/{i}" for i in range(5)]
    for key in keys:
        direct.put(key, b"x")
    proxy.inject("pass", "503")  # the second page's request fails once
    pages = s3url.list_pages(
        store.client.list_objects_v2,
        lambda request: store._call("list", "k/", request),
        Bucket=store.bucket,
        Prefix=store.prefix + "k/",
        MaxKeys=2,
    )
    assert [[item["Key"] for item in page["Contents"]] for page in pages] == [
        [store.prefix + k for k in keys[i : i + 2]] for i in (0, 2, 4)
    ]
    assert proxy.injected == ["pass", "503"] and proxy.requests == 4
    proxy.inject("503")
    assert sorted(store.list("k/")) == keys  # the store's own listing goes the same way


def test_persistent_errors_fail_after_the_attempts_with_one_line(proxied_store):
    store, proxy, _ = proxied_store
    proxy.always("503")
    started = time.monotonic()
    with pytest.raises(StoreError) as error:
        store.get("chunks/y")
    assert len(proxy.injected) == store.attempts == 6
    assert time.monotonic() - started < 10  # the pauses: 0.2 s doubling, capped at 5 s
    assert "SlowDown" in str(error.value) and "\n" not in str(error.value)


def test_a_silent_endpoint_fails_after_a_few_stalls_not_every_attempt(aws_credentials):
    """Each stall costs a whole read timeout: an S3Store gives up after STALL_ATTEMPTS of them, not `attempts`."""
    server = SilentServer()
    store = S3Store(s3url.parse(f"s3://chunks/p?endpoint_url={server.endpoint}&path_style=true"), read_timeout=0.5)
    try:
        with pytest.raises(StoreError, match=r"did not answer within 0\.5 s, 3 times"):
            store.get("chunks/z")
    finally:
        server.stop()
        store.close()
    assert server.connections == STALL_ATTEMPTS < store.attempts


class _BotocoreOnly:
    usable = False

    def close(self) -> None:
        pass


def _both_ways(store: S3Store, key: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """(exception type, one-line error) of a read through presigned URLs, then through botocore's get_object."""
    messages = []
    for getter in (None, _BotocoreOnly()):
        store._getter = getter
        with pytest.raises(StoreError) as error:
            store.get(key)
        messages.append((type(error.value).__name__, str(error.value)))
    return messages[0], messages[1]


def test_reads_go_through_presigned_urls_and_fail_exactly_as_botocore_reads(proxied_store):
    """The chunk path's lean GETs (layerstore/stores/presigned.py): one request per attempt, the same retries,
    and the same one-line errors as get_object for a missing object and a missing bucket."""
    store, proxy, direct = proxied_store
    data = os.urandom(300_000)
    direct.put("chunks/a", data)
    assert store.get("chunks/a") == data and store._getter.usable
    assert proxy.requests == 1
    proxy.inject("503", "reset")
    assert store.get("chunks/a") == data
    assert proxy.injected == ["503", "reset"] and proxy.requests == 4
    lean, boto = _both_ways(store, "chunks/missing")
    assert lean == boto and lean[0] == "ObjectNotFound", (lean, boto)
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    other = S3Store(s3url.parse(f"s3://{bucket}/p?endpoint_url={proxy.endpoint}&path_style=true"), attempts=1)
    try:
        lean, boto = _both_ways(other, "chunks/a")
        assert lean == boto and "does not exist" in lean[1], (lean, boto)
    finally:
        other.close()


def test_reads_keep_their_connection_and_replace_one_the_server_closed(tmp_path, aws_credentials):
    """Keep-alive GETs (nginx keeps connections): one connection per thread, and a kept connection the server has
    dropped meanwhile (its idle timeout) is replaced without an error or a retry."""
    (tmp_path / "bucket" / "p" / "chunks").mkdir(parents=True)
    (tmp_path / "bucket" / "p" / "chunks" / "b").write_bytes(b"b" * 1000)
    nginx = start_nginx(tmp_path, workers=1)
    store = S3Store(s3url.parse(f"s3://bucket/p?endpoint_url=http://127.0.0.1:{nginx.port}&path_style=true"), attempts=1)
    try:
        assert store.get("chunks/b") == b"b" * 1000
        conn = store._getter._local.conn
        assert store.get("chunks/b") == b"b" * 1000 and store._getter._local.conn is conn  # kept alive
        conn.sock.shutdown(socket.SHUT_RDWR)  # the connection is gone under the getter
        assert store.get("chunks/b") == b"b" * 1000
        assert store._getter._local.conn is not conn
    finally:
        store.close()
        nginx.stop()


def test_a_proxied_endpoint_keeps_botocore_reads(proxied_store, monkeypatch):
    """http.client does not speak to HTTP proxies: where one applies to the endpoint, reads stay on botocore."""
    store = proxied_store[0]
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "")
    assert PresignedGetter(store.client, store.bucket, 1.0).usable is False
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert PresignedGetter(store.client, store.bucket, 1.0).usable is True


class _RegionRedirectingServer:
    """Answers presigned GETs with S3's 301 PermanentRedirect (as S3 does when the URL names the wrong region) and
    header-signed GETs with the object: only botocore's get_object (which follows such answers) gets the bytes."""

    def __init__(self, body: bytes) -> None:
        self.presigned = self.signed = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if "X-Amz-Signature=" in self.path:
                    server.presigned += 1
                    answer = b"<Error><Code>PermanentRedirect</Code><Message>use the bucket's region</Message></Error>"
                    self.send_response(301)
                else:
                    server.signed += 1
                    answer = body
                    self.send_response(200)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_an_answer_only_botocore_follows_sends_reads_back_to_botocore(aws_credentials):
    server = _RegionRedirectingServer(b"chunk bytes")
    store = S3Store(s3url.parse(f"s3://bucket/p?endpoint_url={server.endpoint}&path_style=true"), attempts=1)
    try:
        assert store.get("chunks/a") == b"chunk bytes"
        assert store.get("chunks/b") == b"chunk bytes"
        assert store._getter.usable is False
        assert (server.presigned, server.signed) == (1, 2)
    finally:
        store.close()
        server.stop()


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that nobody trusts, and its key."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = serialization.Encoding.PEM
    key_path.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


def test_an_untrusted_certificate_fails_once_as_with_botocore(tmp_path, aws_credentials):
    """TLS verification failures are not retried and read as botocore's SSLError, whichever path made the request."""
    server = _RegionRedirectingServer(b"x")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*_self_signed(tmp_path))
    server.httpd.socket = context.wrap_socket(server.httpd.socket, server_side=True)
    endpoint = server.endpoint.replace("http://", "https://")
    store = S3Store(s3url.parse(f"s3://bucket/p?endpoint_url={endpoint}&path_style=true"))
    try:
        lean, boto = _both_ways(store, "chunks/a")
        assert lean[0] == boto[0] == "StoreError" and "SSLError" in lean[1] and "SSLError" in boto[1], (lean, boto)
        assert server.presigned == server.signed == 0
    finally:
        store.close()
        server.stop()
