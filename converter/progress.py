"""A one-line progress display for conversions, shown only on a terminal."""

from __future__ import annotations

import sys
import threading
import time


class Progress:
    """Aggregates uncompressed bytes across concurrently converted layers."""

    def __init__(self, enabled: bool | None = None, stream=sys.stderr) -> None:
        self.enabled = stream.isatty() if enabled is None else enabled
        self.stream = stream
        self._lock = threading.Lock()
        self._bytes: dict[str, int] = {}
        self._layers_total = 0
        self._layers_done = 0
        self._started = time.monotonic()
        self._last = 0.0
        self.label = ""

    def begin(self, label: str, layers: int) -> None:
        """Start a manifest's layers."""
        with self._lock:
            self.label, self._layers_total, self._layers_done = label, layers, 0
        self._draw(force=True)

    def layer_bytes(self, layer: str, count: int) -> None:
        """Record that `count` uncompressed bytes of `layer` were converted so far."""
        with self._lock:
            self._bytes[layer] = count
        self._draw()

    def layer_done(self) -> None:
        with self._lock:
            self._layers_done += 1
        self._draw(force=True)

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        total = sum(self._bytes.values())
        rate = total / max(now - self._started, 1e-6)
        line = f"\r{self.label}: layers {self._layers_done}/{self._layers_total}  {total / 1e6:8.1f} MB  {rate / 1e6:6.1f} MB/s"
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
