"""s3:// stores through boto3 (AWS S3 or any S3-compatible server)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from layerstore import s3url
from layerstore.errors import ObjectNotFound, StoreError, StoreUnreachable
from layerstore.s3url import S3Location
from layerstore.stores.base import Bytes, Store, parallel_sizes
from layerstore.stores.presigned import PresignedGetter, UseBotocore

T = TypeVar("T")


class S3Store(Store):
    """Objects under s3://bucket/prefix/; a PUT is atomic, so no temp objects are needed.

    Endpoint, region and credentials come from the standard AWS configuration
    (environment, ~/.aws/config, instance roles), overridable per store. Retries follow
    the one S3 policy (`layerstore/s3url.py`): botocore makes one attempt, this store retries. Whole-object
    reads go out as presigned URLs on plain keep-alive connections (`presigned.py`), failing as botocore would.
    """

    remote = True

    def __init__(
        self,
        location: S3Location,
        *,
        max_connections: int = 32,
        attempts: int = 6,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
    ) -> None:
        """attempts: tries per call (1 for a caller that retries itself);
        read_timeout: seconds without a byte from the server before an attempt fails."""
        self.location = location
        self.bucket = location.bucket
        self.prefix = location.prefix
        self.url = location.url
        self.attempts = attempts
        self.read_timeout = read_timeout
        self._max_connections = max_connections
        self.client = s3url.make_client(
            location, connect_timeout=connect_timeout, read_timeout=read_timeout, max_connections=max_connections
        )
        self.endpoint_url = self.client.meta.endpoint_url
        self._getter: PresignedGetter | None = None  # made at the first get
        self._pool = ThreadPoolExecutor(max_connections, thread_name_prefix="s3store")

    def single_attempt(self, timeout: float) -> S3Store:
        """This store for a caller that retries itself: one request per call (no retries beneath
        the caller's), each failing after `timeout` s without an answer."""
        return S3Store(
            self.location,
            max_connections=self._max_connections,
            attempts=1,
            connect_timeout=min(10.0, timeout),
            read_timeout=timeout,
        )

    def _call(self, action: str, key: str, fn: Callable[[], T]) -> T:
        """fn() under the S3 retry policy; a failure becomes a StoreError (ObjectNotFound if absent)."""
        try:
            return s3url.call(fn, what=f"{action} {self.url}{key}", attempts=self.attempts)
        except s3url.CallFailed as failure:
            message = failure.describe(
                action=action, target=self.url + key, endpoint=self.endpoint_url, timeout=self.read_timeout
            )
            if failure.kind == s3url.MISSING:
                raise ObjectNotFound(message) from None
            if failure.kind in (s3url.UNREACHABLE, s3url.STALLED):
                raise StoreUnreachable(message) from None
            raise StoreError(message) from None

    def _key(self, key: str) -> dict[str, str]:
        return {"Bucket": self.bucket, "Key": self.prefix + key}

    def get(self, key: str) -> bytes:
        getter = self._getter
        if getter is None:
            getter = self._getter = PresignedGetter(self.client, self.bucket, self.read_timeout)
        if getter.usable:
            try:
                return self._call("read", key, lambda: getter.get(self.prefix + key))
            except UseBotocore:
                getter.usable = False  # e.g. a bucket in another region: botocore follows S3's redirect
        return self._call("read", key, lambda: self.client.get_object(**self._key(key))["Body"].read())

    def put(self, key: str, data: Bytes) -> None:
        body = bytes(data)
        self._call("write", key, lambda: self.client.put_object(**self._key(key), Body=body))

    def _head(self, key: str) -> dict | None:
        try:
            return self._call("stat", key, lambda: self.client.head_object(**self._key(key)))
        except ObjectNotFound:
            return None

    def size(self, key: str) -> int | None:
        head = self._head(key)
        return None if head is None else head["ContentLength"]

    def modified(self, key: str) -> float | None:
        head = self._head(key)
        return None if head is None else head["LastModified"].timestamp()

    def sizes(self, keys: Iterable[str]) -> dict[str, int | None]:
        return parallel_sizes(self, keys, self._pool)

    def list(self, prefix: str) -> Iterator[str]:
        return (key for key, _ in self.list_sized(prefix))

    def list_sized(self, prefix: str) -> Iterator[tuple[str, int]]:
        pages = s3url.list_pages(
            self.client.list_objects_v2,
            lambda request: self._call("list", prefix, request),
            Bucket=self.bucket,
            Prefix=self.prefix + prefix,
        )
        for page in pages:
            for item in page.get("Contents", []):
                yield item["Key"][len(self.prefix) :], item["Size"]

    def delete_many(self, keys: Iterable[str]) -> int:
        keys = list(keys)
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = keys[start : start + 1000]
            objects = {"Objects": [{"Key": self.prefix + k} for k in batch], "Quiet": True}
            result = self._call(
                "delete", batch[0], functools.partial(self.client.delete_objects, Bucket=self.bucket, Delete=objects)
            )
            errors = result.get("Errors") or []
            if errors:
                first = errors[0]
                raise StoreError(
                    f"cannot delete {len(errors)} object(s) in {self.url} (endpoint {self.endpoint_url}), "
                    f"e.g. {first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )
        return len(keys)

    def delete(self, key: str) -> None:
        self._call("delete", key, lambda: self.client.delete_object(**self._key(key)))

    def copy_to(self, key: str, dest: Store) -> int:
        if isinstance(dest, S3Store) and dest.endpoint_url == self.endpoint_url:
            source = self._key(key)
            dest._call("copy", key, lambda: dest.client.copy_object(**dest._key(key), CopySource=source))
            return 0
        return super().copy_to(key, dest)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        if self._getter is not None:
            self._getter.close()
        self.client.close()
