"""Where a checkpoint lives: s3://bucket/prefix (boto3 resolves, lists and presigns) or a local directory.

A location lists the objects directly under it, reads small objects whole
(the index, a manifest) and hands out a range reader for the big ones.
s3 URLs take the same options as layerstore's store URLs:
`?endpoint_url=...&region=...&path_style=true`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

from weightstream.errors import CheckpointNotFound, FetchError
from weightstream.httpreader import RETRY_STATUS, STALL_ATTEMPTS, HttpRangeReader, ObjectRef, backoff_delay
from weightstream.localreader import LocalRangeReader
from weightstream.options import StreamOptions

log = logging.getLogger(__name__)
T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_MISSING_KEY = {"NoSuchKey", "404", "NotFound"}  # S3 error codes (a HEAD has no body: its code is the status)
SMALL_LIMIT = 100_000_000  # index and manifest files are read whole; refuse anything absurd
PRESIGN_SECONDS = 3600


class _BucketMissing(CheckpointNotFound):
    """The bucket itself does not exist (S3 code NoSuchBucket)."""


class Location(ABC):
    """A directory of objects; `explicit` is set when the URL named one object in it."""

    url: str
    explicit: str | None
    reader: HttpRangeReader | LocalRangeReader

    @abstractmethod
    def ref(self, name: str) -> ObjectRef: ...

    @abstractmethod
    def names(self) -> list[str]:
        """Objects directly under this location (no recursion)."""
        ...

    @abstractmethod
    def read_small(self, name: str) -> bytes:
        """A small object's whole content (index, manifest)."""
        ...

    @abstractmethod
    def exists(self, name: str) -> bool:
        """Whether the object is there (no listing: works on servers and buckets that cannot list)."""
        ...

    def close(self) -> None:
        self.reader.close()


class LocalLocation(Location):
    """A local directory (file:///path or a plain path)."""

    def __init__(self, path: str) -> None:
        path = os.path.abspath(path)
        if os.path.isdir(path):
            self.root, self.explicit = path, None
        elif os.path.isfile(path) or path.endswith((".safetensors", ".json")):
            self.root, self.explicit = os.path.dirname(path), os.path.basename(path)
        else:
            raise CheckpointNotFound(f"{path} does not exist: give a checkpoint directory or a .safetensors file")
        self.url = f"file://{self.root}/"
        self.reader = LocalRangeReader()

    def ref(self, name: str) -> ObjectRef:
        return ObjectRef(self.url + name, os.path.join(self.root, name))

    def names(self) -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(self.root) if e.is_file())
        except OSError as e:
            raise FetchError(f"cannot list {self.url}: {e.strerror}") from None

    def exists(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self.root, name))

    def read_small(self, name: str) -> bytes:
        path = os.path.join(self.root, name)
        try:
            if os.path.getsize(path) > SMALL_LIMIT:
                raise FetchError(f"{self.url}{name} is over {SMALL_LIMIT} bytes: not an index or manifest")
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise CheckpointNotFound(f"{self.url}{name} not found") from None
        except OSError as e:
            raise FetchError(f"cannot read {self.url}{name}: {e.strerror}") from None


class S3Location(Location):
    """s3://bucket/prefix/: boto3 for listing, small reads and presigning; ranged GETs through HttpRangeReader."""

    def __init__(
        self,
        url: str,
        options: StreamOptions,
        endpoint_url: str | None = None,
        region: str | None = None,
        path_style: bool | None = None,
    ) -> None:
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(query) - {"endpoint_url", "region", "path_style"}
        if unknown:
            raise ValueError(f"{url!r}: unknown option(s) {', '.join(sorted(unknown))} (known: endpoint_url, region, path_style)")
        if not parts.netloc:
            raise ValueError(f"{url!r} has no bucket: use s3://bucket/prefix/")
        self.bucket = parts.netloc
        key = parts.path.lstrip("/")
        if key.endswith((".safetensors", ".json")):
            self.prefix, _, self.explicit = key.rpartition("/")
            self.prefix = self.prefix + "/" if self.prefix else ""
        else:
            self.prefix, self.explicit = (key.rstrip("/") + "/" if key.strip("/") else ""), None
        self.url = f"s3://{self.bucket}/{self.prefix}"
        self._endpoint = query.get("endpoint_url") or endpoint_url
        self._region = query.get("region") or region
        style = query.get("path_style")
        self._path_style = (style.lower() in _TRUE) if style is not None else bool(path_style)
        self._options = options
        self.client = self._client(self._region)
        self._urls: dict[str, str] = {}
        self._lock = threading.Lock()
        self.reader = HttpRangeReader(self._presign, options)

    def _client(self, region: str | None):
        import boto3
        import botocore
        import botocore.config

        session = boto3.session.Session(region_name=region)
        # One attempt per call, under the stream's timeouts: _call() retries above it with the ranged reads' policy.
        config = botocore.config.Config(
            s3={"addressing_style": "path" if self._path_style else "auto"},
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=self._options.connect_timeout,
            read_timeout=self._options.stall_timeout,
        )
        if session.get_credentials() is None:  # no credentials anywhere: a public bucket, unsigned URLs
            config = config.merge(botocore.config.Config(signature_version=botocore.UNSIGNED))
        return session.client("s3", endpoint_url=self._endpoint, config=config)

    def _call(self, action: str, name: str, call: Callable[[], T]) -> T:
        """call() with the ranged reads' retry policy: a 5xx or a broken connection is retried with backoff
        (max_retries), a call that gets no answer for stall_timeout at most STALL_ATTEMPTS times in all."""
        import botocore.exceptions

        failures = stalls = 0
        while True:
            try:
                return call()
            except (botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError) as e:
                stalls += 1
                if stalls >= STALL_ATTEMPTS:
                    raise self._fail(action, name, e) from None
                error: Exception = e
            except botocore.exceptions.ClientError as e:
                if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") not in RETRY_STATUS:
                    raise self._fail(action, name, e) from None
                error = e
            except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionClosedError) as e:
                error = e
            except botocore.exceptions.BotoCoreError as e:
                raise self._fail(action, name, e) from None
            failures += 1
            if failures > self._options.max_retries:
                raise self._fail(action, name, error) from None
            delay = backoff_delay(self._options, failures)
            log.info("%s%s: %s: %s; retrying in %.2fs", self.url, name, action, error, delay)
            time.sleep(delay)

    def _fail(self, action: str, name: str, error: Exception) -> FetchError:
        import botocore.exceptions

        if isinstance(error, botocore.exceptions.ClientError):
            code = error.response.get("Error", {}).get("Code", "")
            if code in _MISSING_KEY:
                return CheckpointNotFound(f"{self.url}{name} not found")
            if code == "NoSuchBucket":
                return _BucketMissing(f"bucket {self.bucket!r} does not exist (endpoint {self.client.meta.endpoint_url})")
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return FetchError(f"access denied to {self.url} ({action} {name}): check the AWS credentials")
            return FetchError(f"cannot {action} {self.url}{name}: {code} {error}")
        if isinstance(error, botocore.exceptions.NoCredentialsError):
            return FetchError(f"no AWS credentials for {self.url}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile")
        if isinstance(error, (botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError)):
            return FetchError(
                f"cannot {action} {self.url}{name}: endpoint {self.client.meta.endpoint_url} did not answer within "
                f"{self._options.stall_timeout:g} s, {STALL_ATTEMPTS} times: check the endpoint and the network"
            )
        return FetchError(f"cannot {action} {self.url}{name} (endpoint {self.client.meta.endpoint_url}): {error}")

    def _presign(self, obj: ObjectRef, refresh: bool) -> str:
        with self._lock:
            url = self._urls.get(obj.key)
            if url is None or refresh:
                url = self.client.generate_presigned_url(
                    "get_object", Params={"Bucket": self.bucket, "Key": obj.key}, ExpiresIn=PRESIGN_SECONDS
                )
                self._urls[obj.key] = url
            return url

    def ref(self, name: str) -> ObjectRef:
        return ObjectRef(self.url + name, self.prefix + name)

    def names(self) -> list[str]:
        def listing() -> list[str]:
            names: list[str] = []
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix, Delimiter="/"
            ):
                self._learn_region(page)
                names += [item["Key"][len(self.prefix) :] for item in page.get("Contents", [])]
            return names

        return sorted(n for n in self._call("list", "", listing) if n and "/" not in n)

    def exists(self, name: str) -> bool:
        try:
            response = self._call("stat", name, lambda: self.client.head_object(Bucket=self.bucket, Key=self.prefix + name))
        except _BucketMissing:
            raise
        except CheckpointNotFound:
            return False  # told by the S3 error code; a missing bucket's bare 404 to a HEAD too (the listing names it)
        self._learn_region(response)
        return True

    def _learn_region(self, response: dict) -> None:
        """Presigned URLs must be signed for the bucket's own region: take it from the response."""
        region = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")
        if region and self._region is None and region != self.client.meta.region_name and self._endpoint is None:
            self._region = region
            self.client = self._client(region)

    def read_small(self, name: str) -> bytes:
        def read() -> bytes:
            response = self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)
            if response.get("ContentLength", 0) > SMALL_LIMIT:
                response["Body"].close()
                raise FetchError(f"{self.url}{name} is over {SMALL_LIMIT} bytes: not an index or manifest")
            return response["Body"].read()

        return self._call("read", name, read)


def open_location(
    url: str,
    options: StreamOptions,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    path_style: bool | None = None,
) -> Location:
    """A Location for s3://bucket/prefix[/file], file:///path or a plain path."""
    parts = urlsplit(url)
    if parts.scheme == "s3":
        return S3Location(url, options, endpoint_url, region, path_style)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{url!r}: file URLs need an absolute path (file:///path)")
        return LocalLocation(parts.path)
    if parts.scheme == "" or (len(parts.scheme) == 1 and os.name == "nt"):
        return LocalLocation(url)
    raise ValueError(f"unsupported checkpoint URL {url!r}: use s3://bucket/prefix/, file:///path or a path")
