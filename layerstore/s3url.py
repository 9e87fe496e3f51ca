"""s3:// URLs and S3 clients: one parser, one set of client settings and one retry policy for every S3 user
(the stores in `layerstore/stores/s3.py`, weightstream's checkpoints in `weightstream/sources.py`).

URL: `s3://bucket[/prefix][?endpoint_url=URL&region=NAME&path_style=true]`. Endpoint, region and
credentials otherwise come from the standard AWS configuration (environment, ~/.aws/config, roles).

Retry policy (every S3 call liftoff makes):
- botocore makes ONE attempt per call (`make_client`); liftoff retries above it with `layerstore.retry.Backoff`,
  so the two never multiply and every retry is bounded and logged the same way (botocore's own retry settings,
  AWS_MAX_ATTEMPTS included, do not apply).
- Retried: the statuses in `layerstore.retry.RETRY_STATUS`, S3's throttling and request-timeout codes, refused,
  reset or truncated connections. A call that gets no answer within the client's read timeout is retried too,
  but fails after `STALL_ATTEMPTS` such stalls (each costs a whole timeout). Anything else fails at once.
- Who retries: the chunk fetcher (`layerstore/fetch.py`) over its list of stores within its time budget (its
  stores make one attempt per call: `Store.single_attempt`); an S3Store otherwise (convert, replicate, gc,
  leases) with `call(..., attempts=6)`, 60 s read timeout; weightstream with `max_retries + 1` attempts and
  `stall_timeout` as the read timeout.

This module imports only the standard library and layerstore's errors and retry modules (botocore is imported
when a client is made), so weightstream's weights-only install can use it.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import parse_qsl, urlsplit

from layerstore.errors import StoreError
from layerstore.retry import STALL_ATTEMPTS, Backoff, retryable_status

if TYPE_CHECKING:
    from botocore.client import BaseClient

log = logging.getLogger(__name__)
T = TypeVar("T")

OPTIONS = ("endpoint_url", "region", "path_style")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
# Every name S3 has accepted (today's rules, plus the upper case and underscores of old us-east-1 buckets).
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]")
_REGION = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")  # what botocore accepts
# S3 error codes worth another try whatever their status (RequestTimeout comes as a 400).
RETRY_CODES = frozenset({"RequestTimeout", "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled"})


class S3URLError(StoreError, ValueError):
    """An s3:// URL (or an option given with it) is malformed."""


@dataclass(frozen=True)
class S3Location:
    """Where objects live in S3: `key` is the path after the bucket as written (no leading "/")."""

    bucket: str
    key: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    path_style: bool = False

    @property
    def prefix(self) -> str:
        """The key as a directory: "" for the whole bucket, else "a/b/"."""
        return self.key.strip("/") + "/" if self.key.strip("/") else ""

    @property
    def url(self) -> str:
        """s3://bucket/prefix/ (without the options)."""
        return f"s3://{self.bucket}/{self.prefix}"


def _flag(url: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise S3URLError(f"{url!r}: path_style={value!r} is neither true nor false")


def parse(url: str, *, endpoint_url: str | None = None, region: str | None = None, path_style: bool | None = None) -> S3Location:
    """The S3Location an s3:// URL names; the URL's own options win over the keyword arguments."""
    parts = urlsplit(url)
    if parts.scheme != "s3":
        raise S3URLError(f"{url!r} is not an s3:// URL: use s3://bucket/prefix")
    if not parts.netloc:
        raise S3URLError(f"{url!r} has no bucket: use s3://bucket/prefix")
    if not _BUCKET.fullmatch(parts.netloc) or ".." in parts.netloc:
        raise S3URLError(
            f"{url!r}: {parts.netloc!r} is not a valid bucket name "
            "(3-63 lower-case letters, digits, dots and hyphens, starting and ending with a letter or digit)"
        )
    if parts.fragment:
        raise S3URLError(f"{url!r} has a fragment (#{parts.fragment}): S3 keys cannot hold '#' in a URL; drop it")
    query: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in OPTIONS:
            raise S3URLError(f"{url!r}: unknown option {name!r} (known: {', '.join(OPTIONS)})")
        if not value:
            raise S3URLError(f"{url!r}: option {name} has no value")
        if name in query and query[name] != value:
            raise S3URLError(f"{url!r}: option {name} is given twice with different values")
        query[name] = value
    endpoint = query.get("endpoint_url") or endpoint_url
    if endpoint is not None:
        endpoint_parts = urlsplit(endpoint)
        if endpoint_parts.scheme not in ("http", "https") or not endpoint_parts.netloc:
            raise S3URLError(f"{url!r}: endpoint_url {endpoint!r} is not an http(s)://host[:port] URL")
    region = query.get("region") or region
    if region is not None and not _REGION.fullmatch(region):
        raise S3URLError(f"{url!r}: region {region!r} is not a region name (like us-east-1)")
    style = _flag(url, query["path_style"]) if "path_style" in query else bool(path_style)
    return S3Location(parts.netloc, parts.path.lstrip("/"), endpoint, region, style)


def make_client(
    location: S3Location,
    *,
    connect_timeout: float,
    read_timeout: float,
    region: str | None = None,
    max_connections: int = 10,
    unsigned_without_credentials: bool = False,
) -> BaseClient:
    """A boto3 S3 client that makes one attempt per call (`call()` retries above it), fails a connection
    after `connect_timeout` s and an answer that stops for `read_timeout` s; `region` overrides the
    location's (a bucket's own region, learned from a response). With `unsigned_without_credentials`,
    no credentials anywhere means a public bucket: requests go unsigned."""
    import boto3
    import botocore
    import botocore.config

    session = boto3.session.Session(region_name=region or location.region)
    config = botocore.config.Config(
        max_pool_connections=max_connections,
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        s3={"addressing_style": "path" if location.path_style else "auto"},
        signature_version="s3v4",  # requests are SigV4 anyway; this makes presigned URLs SigV4 too (not legacy SigV2)
    )
    if unsigned_without_credentials and session.get_credentials() is None:
        config = config.merge(botocore.config.Config(signature_version=botocore.UNSIGNED))
    return session.client("s3", endpoint_url=location.endpoint_url, config=config)


def error_code(error: Exception) -> str:
    """The S3 error code of a ClientError ("" for anything else); a HEAD has no body, its code is the status."""
    response = getattr(error, "response", None)
    return (response or {}).get("Error", {}).get("Code", "") if isinstance(response, dict) else ""


def is_stall(error: Exception) -> bool:
    """Whether a botocore error means the server did not answer within the client's timeouts."""
    import botocore.exceptions

    return isinstance(error, (botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError))


def retryable(error: Exception) -> bool:
    """Whether another attempt of the failed call may succeed (see the module docstring)."""
    import botocore.exceptions

    if isinstance(error, botocore.exceptions.ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return (status is not None and retryable_status(status)) or error_code(error) in RETRY_CODES
    return isinstance(
        error,
        (
            botocore.exceptions.EndpointConnectionError,
            botocore.exceptions.ConnectionClosedError,
            botocore.exceptions.ConnectTimeoutError,
            botocore.exceptions.ReadTimeoutError,
            botocore.exceptions.ResponseStreamingError,
        ),
    )


# What a failed call means (CallFailed.kind).
MISSING = "missing"
NO_BUCKET = "no-bucket"
DENIED = "denied"
NO_CREDENTIALS = "no-credentials"
STALLED = "stalled"
UNREACHABLE = "unreachable"
FAILED = "failed"
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})  # a HEAD has no body: its code is the status
_DENIED_CODES = frozenset({"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"})


class CallFailed(Exception):
    """A call that `call()` gave up on: the last botocore error, what it means, and how many attempts stalled."""

    def __init__(self, error: Exception, stalls: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.stalls = stalls
        self.kind = _kind(error)

    def describe(self, *, action: str, target: str, endpoint: str, timeout: float) -> str:
        """One line for the operator: what failed (`action` on `target`, an s3:// URL), why, and what to do."""
        error = self.error
        if self.kind == MISSING:
            return f"{target} not found"
        if self.kind == NO_BUCKET:
            bucket = urlsplit(target).netloc
            return f"bucket {bucket!r} does not exist at endpoint {endpoint}: create it or fix the URL"
        if self.kind == DENIED:
            return f"access denied to {target} ({action}): check the AWS credentials and the bucket policy"
        if self.kind == NO_CREDENTIALS:
            return f"no AWS credentials for {target}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile"
        if self.kind == STALLED:
            times = f", {self.stalls} times" if self.stalls > 1 else ""
            return (
                f"cannot {action} {target}: endpoint {endpoint} did not answer within {timeout:g} s{times}: "
                "check the endpoint and the network"
            )
        if self.kind == UNREACHABLE:
            return f"cannot {action} {target}: endpoint {endpoint} is unreachable ({error})"
        return f"cannot {action} {target} (endpoint {endpoint}): {error_code(error) or type(error).__name__} {error}"


def _kind(error: Exception) -> str:
    import botocore.exceptions

    code = error_code(error)
    if code in _MISSING_CODES:
        return MISSING
    if code == "NoSuchBucket":
        return NO_BUCKET
    if code in _DENIED_CODES:
        return DENIED
    if isinstance(error, botocore.exceptions.NoCredentialsError):
        return NO_CREDENTIALS
    if is_stall(error):
        return STALLED
    if not isinstance(error, botocore.exceptions.ClientError) and retryable(error):
        return UNREACHABLE  # refused, reset or broken connections
    return FAILED


def call(fn: Callable[[], T], *, what: str, attempts: int, backoff: Backoff = Backoff()) -> T:
    """fn() under the retry policy: at most `attempts` tries and `STALL_ATTEMPTS` stalls. When it gives up:
    CallFailed, for the caller to explain (`describe`). `what` names the call in the log."""
    import botocore.exceptions

    pauses = backoff.pauses(attempts)
    stalls = 0
    while True:
        try:
            return fn()
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            stalls += int(is_stall(e))
            if not retryable(e) or stalls >= STALL_ATTEMPTS:
                raise CallFailed(e, stalls) from None
            error = e
        retry = next(pauses, None)
        if retry is None:
            raise CallFailed(error, stalls) from None
        log.info("%s: %s; retry %d of %d", what, error, retry, attempts - 1)


def list_pages(list_objects: Callable[..., dict], run: Callable[[Callable[[], dict]], dict], **params: object) -> Iterator[dict]:
    """The pages of a ListObjectsV2 listing, each request made through `run` (which retries it and explains
    failures), so a failure retries one page rather than the whole listing."""
    while True:
        page = run(functools.partial(list_objects, **params))
        yield page
        if not page.get("IsTruncated") or not page.get("NextContinuationToken"):
            return
        params = {**params, "ContinuationToken": page["NextContinuationToken"]}
