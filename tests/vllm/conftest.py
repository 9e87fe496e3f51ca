"""tests/vllm reuses weightstream's S3 fixture: a fresh bucket and prefix on the moto server."""

from tests.weightstream.conftest import s3_prefix  # noqa: F401
