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
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit

from layerstore import s3url
from layerstore.retry import Backoff
from weightstream.errors import CheckpointNotFound, FetchError
from weightstream.httpreader import HttpRangeReader, ObjectRef
from weightstream.localreader import LocalRangeReader
from weightstream.options import StreamOptions

log = logging.getLogger(__name__)
T = TypeVar("T")

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
    """s3://bucket/prefix/: boto3 for listing, small reads and presigning; ranged GETs through HttpRangeReader.

    Every boto3 call follows the one S3 retry policy (`layerstore/s3url.py`) with the stream's settings:
    max_retries + 1 attempts, stall_timeout as the read timeout, backoff_base/backoff_max.
    """

    def __init__(
        self,
        url: str,
        options: StreamOptions,
        endpoint_url: str | None = None,
        region: str | None = None,
        path_style: bool | None = None,
    ) -> None:
        self.location = s3url.parse(url, endpoint_url=endpoint_url, region=region, path_style=path_style)
        self.bucket = self.location.bucket
        if self.location.key.endswith((".safetensors", ".json")):
            self.prefix, _, self.explicit = self.location.key.rpartition("/")
            self.prefix = self.prefix + "/" if self.prefix else ""
        else:
            self.prefix, self.explicit = self.location.prefix, None
        self.url = f"s3://{self.bucket}/{self.prefix}"
        self._region = self.location.region
        self._options = options
        self._backoff = Backoff(options.backoff_base, options.backoff_max)
        self.client = self._client(self._region)
        self._urls: dict[str, str] = {}
        self._lock = threading.Lock()
        self.reader = HttpRangeReader(self._presign, options)

    def _client(self, region: str | None):
        return s3url.make_client(
            self.location,
            region=region,
            connect_timeout=self._options.connect_timeout,
            read_timeout=self._options.stall_timeout,
            unsigned_without_credentials=True,  # no credentials anywhere: a public bucket, unsigned URLs
        )

    def _call(self, action: str, name: str, call: Callable[[], T]) -> T:
        """call() under the S3 retry policy (max_retries retries, at most STALL_ATTEMPTS stalls); a failure
        becomes a FetchError (CheckpointNotFound if absent)."""
        attempts = self._options.max_retries + 1
        try:
            return s3url.call(call, what=f"{action} {self.url}{name}", attempts=attempts, backoff=self._backoff)
        except s3url.CallFailed as failure:
            message = failure.describe(
                action=action,
                target=self.url + name,
                endpoint=self.client.meta.endpoint_url,
                timeout=self._options.stall_timeout,
            )
            kinds = {s3url.MISSING: CheckpointNotFound, s3url.NO_BUCKET: _BucketMissing}
            raise kinds.get(failure.kind, FetchError)(message) from None

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
        names: list[str] = []
        pages = s3url.list_pages(
            lambda **request: self.client.list_objects_v2(**request),  # self.client changes if the region is learned
            lambda request: self._call("list", "", request),
            Bucket=self.bucket,
            Prefix=self.prefix,
            Delimiter="/",
        )
        for page in pages:
            self._learn_region(page)
            names += [item["Key"][len(self.prefix) :] for item in page.get("Contents", [])]
        return sorted(n for n in names if n and "/" not in n)

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
        if region and self._region is None and region != self.client.meta.region_name and self.location.endpoint_url is None:
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
