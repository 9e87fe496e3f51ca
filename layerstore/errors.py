"""Errors that carry a one-line, actionable message for the operator."""


class LiftoffError(Exception):
    """Base class: str(error) is a complete one-line explanation."""


class StoreError(LiftoffError):
    """A store could not be read or written (unreachable, denied, broken)."""


class ObjectNotFound(StoreError):
    """The object does not exist in the store."""


class FormatError(LiftoffError):
    """Stored data is malformed: corrupt chunk, truncated index, unknown version."""


class ImageError(LiftoffError):
    """The source image is malformed or unsupported (bad tar, digest mismatch, media type)."""


class RegistryError(LiftoffError):
    """A registry refused or failed a request."""
