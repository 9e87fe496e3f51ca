"""s3:// stores through boto3 (AWS S3 or any S3-compatible server)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import boto3
import botocore.config
import botocore.exceptions

from layerstore.errors import ObjectNotFound, StoreError
from layerstore.stores.base import Bytes, Store, parallel_sizes

_NETWORK_ERRORS = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectionClosedError,
    botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ResponseStreamingError,
)


class S3Store(Store):
    """Objects under s3://bucket/prefix/; a PUT is atomic, so no temp objects are needed.

    Endpoint, region and credentials come from the standard AWS configuration
    (environment, ~/.aws/config, instance roles), overridable per store.
    """

    remote = True

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        path_style: bool = False,
        max_connections: int = 32,
        attempts: int = 6,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
    ) -> None:
        """attempts: tries per call, botocore's retries included (1 for a caller that retries itself);
        read_timeout: seconds without a byte from the server before an attempt fails."""
        if not bucket:
            raise StoreError("s3 store URL has no bucket: use s3://bucket[/prefix]")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}"
        self.endpoint_url = endpoint_url
        self._settings = {"region": region, "path_style": path_style, "max_connections": max_connections}
        self.read_timeout = read_timeout
        config = botocore.config.Config(
            max_pool_connections=max_connections,
            retries={"total_max_attempts": attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            s3={"addressing_style": "path" if path_style else "auto"},
        )
        session = boto3.session.Session(region_name=region)
        self.client = session.client("s3", endpoint_url=endpoint_url, config=config)
        self._where = f"{self.url} (endpoint {self.client.meta.endpoint_url})"
        self._pool = ThreadPoolExecutor(max_connections, thread_name_prefix="s3store")

    def single_attempt(self, timeout: float) -> S3Store:
        """This store for a caller that retries itself: one request per call (no botocore retries beneath
        the caller's), each failing after `timeout` s without an answer."""
        return S3Store(
            self.bucket,
            self.prefix,
            endpoint_url=self.endpoint_url,
            attempts=1,
            connect_timeout=min(10.0, timeout),
            read_timeout=timeout,
            **self._settings,  # type: ignore[arg-type]
        )

    def _fail(self, action: str, key: str, e: Exception) -> StoreError:
        if isinstance(e, botocore.exceptions.ClientError):
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound"):
                return ObjectNotFound(f"{key} not found in {self._where}")
            if code == "NoSuchBucket":
                return StoreError(f"bucket {self.bucket!r} does not exist at {self._where}: create it or fix the URL")
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return StoreError(f"access denied to {self._where} ({action} {key}): check the AWS credentials")
            return StoreError(f"cannot {action} {key} in {self._where}: {code or status} {e}")
        if isinstance(e, botocore.exceptions.NoCredentialsError):
            return StoreError(f"no AWS credentials for {self._where}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile")
        if isinstance(e, (botocore.exceptions.ConnectTimeoutError, botocore.exceptions.ReadTimeoutError)):
            return StoreError(
                f"store {self._where} did not answer within {self.read_timeout:g} s ({action} {key}): "
                "check the endpoint and the network"
            )
        if isinstance(e, _NETWORK_ERRORS):
            return StoreError(f"store {self._where} is unreachable ({action} {key}): {e}")
        return StoreError(f"cannot {action} {key} in {self._where}: {e}")

    def get(self, key: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
            return response["Body"].read()
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise self._fail("read", key, e) from None

    def put(self, key: str, data: Bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=bytes(data))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise self._fail("write", key, e) from None

    def size(self, key: str) -> int | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)["ContentLength"]
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            error = self._fail("stat", key, e)
            if isinstance(error, ObjectNotFound):
                return None
            raise error from None

    def modified(self, key: str) -> float | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)["LastModified"].timestamp()
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            error = self._fail("stat", key, e)
            if isinstance(error, ObjectNotFound):
                return None
            raise error from None

    def sizes(self, keys: Iterable[str]) -> dict[str, int | None]:
        return parallel_sizes(self, keys, self._pool)

    def list(self, prefix: str) -> Iterator[str]:
        return (key for key, _ in self.list_sized(prefix))

    def list_sized(self, prefix: str) -> Iterator[tuple[str, int]]:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for item in page.get("Contents", []):
                    yield item["Key"][len(self.prefix) :], item["Size"]
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise self._fail("list", prefix, e) from None

    def delete_many(self, keys: Iterable[str]) -> int:
        keys = list(keys)
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = keys[start : start + 1000]
            try:
                result = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": self.prefix + k} for k in batch], "Quiet": True}
                )
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
                raise self._fail("delete", batch[0], e) from None
            errors = result.get("Errors") or []
            if errors:
                first = errors[0]
                raise StoreError(
                    f"cannot delete {len(errors)} object(s) in {self._where}, e.g. {first.get('Key')}: "
                    f"{first.get('Code')} {first.get('Message')}"
                )
        return len(keys)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise self._fail("delete", key, e) from None

    def copy_to(self, key: str, dest: Store) -> int:
        if isinstance(dest, S3Store) and dest.client.meta.endpoint_url == self.client.meta.endpoint_url:
            try:
                result = dest.client.copy_object(
                    Bucket=dest.bucket,
                    Key=dest.prefix + key,
                    CopySource={"Bucket": self.bucket, "Key": self.prefix + key},
                )
                del result
                return 0
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
                raise self._fail("copy", key, e) from None
        return super().copy_to(key, dest)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self.client.close()
