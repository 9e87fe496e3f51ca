"""Tunables of the data path, with the defaults chosen by measurement (benchmarks/RESULTS.md)."""

from __future__ import annotations

from dataclasses import dataclass, replace

MiB = 1 << 20

# Defaults measured with benchmarks/weights.py --sweep (and liftoff weights bench --sweep) on this machine (2 cores)
# against nginx, direct and through the shaping proxy (20 ms first byte, 100 MB/s per connection, 1 GB/s total);
# see benchmarks/RESULTS.md. Shaped, 16+ connections are needed to fill the link (4: 0.27-0.36 GB/s, 16: 0.85,
# 32: 0.86-0.88, the link's limit); range size matters little from 8 MiB up (ranges of 4 MiB pay the 20 ms
# first byte too often at low concurrency). Unshaped, 16 MiB x 16 is within the noise of the best cell.
# The pool: streaming with 256 MiB drained at tensor boundaries on the shaped link (0.66 GB/s); 512 MiB
# reached the link limit (0.89), and 1 GiB added nothing.
DEFAULT_RANGE_SIZE = 16 * MiB
DEFAULT_CONCURRENCY = 16
DEFAULT_POOL_BYTES = 512 * MiB
MIN_RANGE_SIZE = 64 * 1024  # below this each GET costs more than it carries
HEADER_PROBE_BYTES = 256 * 1024  # first GET: the 8-byte length and, for almost every file, the whole header


@dataclass(frozen=True)
class StreamOptions:
    """How a checkpoint is fetched.

    range_size: bytes per ranged GET; concurrency: parallel connections;
    pool_bytes: memory the stream may hold ahead of the consumer (the pinned ring on CUDA);
    stall_timeout: seconds without a byte before a connection is abandoned and its range re-requested;
    max_retries: consecutive failed attempts (without progress) before a range fails;
    coalesce_gap: unwanted bytes between wanted pieces read through rather than skipped with a new GET;
    min_piece: sliced tensors whose contiguous pieces are smaller than this are read whole, then narrowed.
    """

    range_size: int = DEFAULT_RANGE_SIZE
    concurrency: int = DEFAULT_CONCURRENCY
    pool_bytes: int = DEFAULT_POOL_BYTES
    connect_timeout: float = 10.0
    stall_timeout: float = 20.0
    max_retries: int = 8
    backoff_base: float = 0.1
    backoff_max: float = 5.0
    coalesce_gap: int = 1 * MiB
    min_piece: int = 256 * 1024

    def __post_init__(self) -> None:
        if self.range_size < MIN_RANGE_SIZE:
            raise ValueError(f"range_size {self.range_size} is below 64 KiB: each GET would cost more than it carries")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.pool_bytes < self.range_size:
            raise ValueError(f"pool_bytes {self.pool_bytes} must hold at least one range ({self.range_size} bytes)")
        if self.stall_timeout <= 0 or self.connect_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")

    def with_(self, **changes: object) -> StreamOptions:
        """A copy with some fields changed (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})
