"""One retry policy for every network call liftoff retries itself.

Exponential backoff with jitter, bounded by a number of attempts and/or a time budget.
Where liftoff retries, the client beneath it makes one attempt per call (botocore's own
retries are turned off there), so the two never multiply.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

# HTTP statuses worth another try: timeouts, throttling and server-side failures.
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Attempts of one request that may get no answer within its timeout before it fails: a stall costs a whole
# timeout, so a server that accepts connections and never answers fails in about STALL_ATTEMPTS timeouts.
STALL_ATTEMPTS = 3


def retryable_status(status: int) -> bool:
    """Whether an HTTP status is worth retrying."""
    return status in RETRY_STATUS


@dataclass(frozen=True)
class Backoff:
    """Delays of `base * 2**(n-1)` seconds, capped at `cap`, scaled by a random factor in [0.5, 1)."""

    base: float = 0.2
    cap: float = 5.0

    def delay(self, failures: int) -> float:
        """The pause before retry number `failures` (1, 2, ...)."""
        return min(self.cap, self.base * 2 ** max(0, failures - 1)) * random.uniform(0.5, 1.0)

    def pauses(self, attempts: int | None = None, budget: float | None = None) -> Iterator[float]:
        """Sleep before each retry and yield its number (1, 2, ...); stop after `attempts` tries in all
        or when the next pause would end past `budget` seconds from this call (not from the first retry)."""
        deadline = None if budget is None else time.monotonic() + budget
        return self._pauses(attempts, deadline)

    def _pauses(self, attempts: int | None, deadline: float | None) -> Iterator[float]:
        failures = 0
        while attempts is None or failures + 1 < attempts:
            failures += 1
            pause = self.delay(failures)
            if deadline is not None and time.monotonic() + pause > deadline:
                return
            time.sleep(pause)
            yield failures
