"""Errors of the weights path: each message names the file (and tensor) and what to do."""

from __future__ import annotations

from layerstore.errors import FormatError, LiftoffError, ObjectNotFound, StoreError


class WeightsError(LiftoffError):
    """Base class for weightstream errors."""


class CheckpointFormatError(WeightsError, FormatError):
    """A safetensors file or its index is malformed (bad header, offsets, dtype, size)."""


class IntegrityError(CheckpointFormatError):
    """A file's sha256 does not match the manifest."""


class FetchError(WeightsError, StoreError):
    """A range could not be read after the retries (unreachable, denied, broken server)."""


class CheckpointNotFound(FetchError, ObjectNotFound):
    """No checkpoint (or one of its shards) exists at the URL."""


class LoadMismatchError(WeightsError):
    """The checkpoint's tensors do not match what the caller asked for (missing, unexpected, shape)."""
