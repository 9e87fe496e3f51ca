"""The one retry policy: bounded by attempts and by time."""

import time

from layerstore.retry import Backoff, retryable_status


def test_delays_grow_and_are_capped():
    policy = Backoff(base=0.1, cap=0.4)
    for n, upper in [(1, 0.1), (2, 0.2), (3, 0.4), (10, 0.4)]:
        d = policy.delay(n)
        assert upper * 0.5 <= d < upper


def test_attempts_bound_the_retries():
    assert list(Backoff(base=0.001, cap=0.001).pauses(attempts=4)) == [1, 2, 3]
    assert list(Backoff(base=0.001).pauses(attempts=1)) == []


def test_budget_bounds_the_time():
    started = time.monotonic()
    retries = list(Backoff(base=0.05, cap=0.05).pauses(budget=0.3))
    elapsed = time.monotonic() - started
    assert 2 <= len(retries) <= 12
    assert elapsed < 0.3 + 0.05


def test_statuses():
    assert retryable_status(429) and retryable_status(503)
    assert not retryable_status(404) and not retryable_status(401)


def test_budget_counts_from_the_call_not_from_the_first_retry():
    """A caller that makes its first attempt after asking for the pauses must not get a longer budget."""
    pauses = Backoff(base=0.01, cap=0.01).pauses(budget=0.1)
    time.sleep(0.15)  # the first attempt took longer than the whole budget
    assert list(pauses) == []
