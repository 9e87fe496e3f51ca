"""Conversion progress: compressed layer bytes read of the manifest's total, one line per image (on a terminal)."""

from __future__ import annotations

from typing import TextIO

from layerstore.progress import ProgressLine


class Progress:
    """The progress of a conversion: begin() each image with its layers' compressed sizes, then count bytes read."""

    def __init__(self, enabled: bool | None = None, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream
        self._line: ProgressLine | None = None

    def begin(self, label: str, total: int) -> None:
        """Start an image whose layer blobs are `total` compressed bytes (ends the previous image's line)."""
        self.close()
        self._line = ProgressLine(total, label, stream=self.stream, enabled=self.enabled)
        self.enabled = self._line.enabled  # decided once: a terminal stays a terminal

    def read(self, n: int) -> None:
        """`n` more compressed bytes of a layer blob read (called from the blob's reader threads)."""
        if self._line is not None:
            self._line.advance(n)

    def skip(self, n: int) -> None:
        """A layer of `n` compressed bytes that was already converted."""
        if self._line is not None:
            self._line.skip(n)

    def close(self) -> None:
        if self._line is not None:
            self._line.close()
            self._line = None
