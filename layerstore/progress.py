"""One progress line on a terminal: bytes done of a total, percent, rate and time left.

`label  123.4 MiB / 1.2 GiB  10%  45.6 MiB/s  ETA 0:12`, redrawn in place (carriage return) at most
five times a second, and finished by close() with the total time instead of the ETA. Shown only when
the stream is a terminal (or `enabled=True`); otherwise every call is a cheap no-op. Thread-safe:
workers may advance one line together. Standard library only (the weights-only wheel ships it).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from layerstore.units import format_size

MIN_INTERVAL = 0.2  # seconds between redraws: at most five a second


def format_duration(seconds: float) -> str:
    """0:07, 12:34, 1:02:03."""
    seconds = max(0, int(seconds + 0.5))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class ProgressLine:
    """A progress line for `total` bytes (None: unknown, no percent or ETA) under `label`.

    advance(n) adds done bytes, skip(n) adds bytes that needed no work (done, but not in the rate:
    a layer already converted), set(done) sets the count. The first change draws at once, later
    ones at most every MIN_INTERVAL seconds; close() draws the final line and ends it.
    """

    def __init__(
        self,
        total: int | None,
        label: str,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.enabled = _is_terminal(self.stream) if enabled is None else enabled
        self.total = total
        self.label = label
        self.done = 0
        self.skipped = 0
        self._clock = clock
        self._started = clock()
        self._last_draw: float | None = None
        self._width = 0  # of the last line drawn, to blank what a shorter line leaves
        self._lock = threading.Lock()
        self._closed = False
        self._follower: threading.Thread | None = None
        self._stop = threading.Event()

    def advance(self, n: int) -> None:
        """`n` more bytes done."""
        if self.enabled and n:
            with self._lock:
                self.done += n
                self._maybe_draw()

    def skip(self, n: int) -> None:
        """`n` more bytes that needed no work: they count as done but not toward the rate."""
        if self.enabled and n:
            with self._lock:
                self.done += n
                self.skipped += n
                self._maybe_draw()

    def set(self, done: int) -> None:
        """`done` bytes done in all."""
        if self.enabled and done != self.done:
            with self._lock:
                self.done = done
                self._maybe_draw()

    def follow(self, read: Callable[[], int], interval: float = MIN_INTERVAL) -> None:
        """Poll `read()` (bytes done) every `interval` seconds on a thread until close(): for work whose
        counter lives elsewhere (a stream's stats)."""
        if not self.enabled or self._follower is not None:
            return

        def run() -> None:
            while not self._stop.wait(interval):
                self.set(read())

        self._follower = threading.Thread(target=run, name="progress", daemon=True)
        self._follower.start()

    def close(self, done: int | None = None) -> None:
        """Stop following, draw the final line (with `done` if given) and end it; once."""
        if not self.enabled or self._closed:
            return
        self._stop.set()
        if self._follower is not None:
            self._follower.join()
        with self._lock:
            self._closed = True
            if done is not None:
                self.done = done
            if self._last_draw is None and not self.done:
                return  # nothing happened and nothing was shown: leave the terminal alone
            self._write(self.render(final=True), "\n")

    def __enter__(self) -> ProgressLine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def render(self, final: bool = False) -> str:
        """The line as it is now (without the carriage return)."""
        elapsed = max(self._clock() - self._started, 1e-6)
        rate = (self.done - self.skipped) / elapsed
        parts = [format_size(self.done)]
        if self.total is not None:
            parts[0] += f" / {format_size(self.total)}"
            percent = 100 if self.total <= 0 else min(100, int(100 * self.done / self.total))
            parts.append(f"{percent}%")
        parts.append(f"{format_size(rate)}/s")
        if final:
            parts.append(f"in {format_duration(elapsed)}")
        elif self.total is not None:
            left = max(0, self.total - self.done)
            parts.append(f"ETA {format_duration(left / rate)}" if rate > 0 else "ETA -:--")
        numbers = "  ".join(parts)
        room = self._columns() - len(numbers) - 3
        label = self.label if len(self.label) <= room else "..." + self.label[-max(room - 3, 0) :]
        return f"{label}  {numbers}" if room > 1 else numbers

    def _maybe_draw(self) -> None:
        now = self._clock()
        if self._closed or (self._last_draw is not None and now - self._last_draw < MIN_INTERVAL):
            return
        self._last_draw = now
        self._write(self.render())

    def _write(self, body: str, end: str = "") -> None:
        """`body` over the line drawn before (blanking what it leaves), then `end`."""
        pad = " " * max(0, self._width - len(body))
        self._width = len(body)
        try:
            self.stream.write("\r" + body + pad + end)
            self.stream.flush()
        except (OSError, ValueError):  # the terminal went away: the work goes on quietly
            self.enabled = False

    def _columns(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns or 80
        except (AttributeError, ValueError, OSError):
            return 80
