"""Errors of the snapshot service, each tied to the gRPC status code containerd expects."""

from __future__ import annotations

import grpc

from layerstore.errors import LiftoffError


class SnapshotterError(LiftoffError):
    """A refused or failed snapshot operation; `code` is the gRPC status to answer with."""

    code = grpc.StatusCode.INTERNAL


class NotFound(SnapshotterError):
    """The snapshot (or parent) does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(SnapshotterError):
    """A snapshot with that key already exists."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(SnapshotterError):
    """The snapshot is in the wrong state (has children, is not active)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class InvalidArgument(SnapshotterError):
    """The request itself is malformed (bad key, label, filter, field mask)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
