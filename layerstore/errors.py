"""Errors that carry a one-line, actionable message for the operator.

Each class names its exit status (`exit_code`) and a stable `error_code` for `--json` error objects, so
that CI can tell "retry later" from "the data is bad" from "fix the command line":
0 ok, 1 error, 2 usage, 3 busy (retry later), 4 verification failed.
"""

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_BUSY = 3
EXIT_VERIFY = 4


class LiftoffError(Exception):
    """Base class: str(error) is a complete one-line explanation."""

    exit_code = EXIT_ERROR
    error_code = "error"


class UsageError(LiftoffError):
    """The command line or the configuration file asks for something impossible (as argparse's own errors)."""

    exit_code = EXIT_USAGE
    error_code = "usage"


class Busy(LiftoffError):
    """Someone else holds what this needs (a lease, a lock): nothing was changed; run it again later."""

    exit_code = EXIT_BUSY
    error_code = "busy"


class VerificationFailed(LiftoffError):
    """A check found stored data corrupt or missing."""

    exit_code = EXIT_VERIFY
    error_code = "verification_failed"


class StoreError(LiftoffError):
    """A store could not be read or written (unreachable, denied, broken)."""

    error_code = "store"


class StoreUnreachable(StoreError):
    """The store did not answer (connection refused, reset or stalled): it may be back any moment.
    (Its `error_code` stays "store", as before it had a class of its own.)"""


class ObjectNotFound(StoreError):
    """The object does not exist in the store."""

    error_code = "not_found"


class FormatError(LiftoffError):
    """Stored data is malformed: corrupt chunk, truncated index, unknown version."""

    error_code = "format"


class ImageError(LiftoffError):
    """The source image is malformed or unsupported (bad tar, digest mismatch, media type)."""

    error_code = "image"


class RegistryError(LiftoffError):
    """A registry refused or failed a request."""

    error_code = "registry"
