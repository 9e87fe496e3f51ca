"""Recording a view's reads: on request (liftoff profile: start, then stop for the trace) and, with
--learn-seconds, the first seconds of every fresh view, kept as a trace file in traces/."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from layerstore.errors import LiftoffError
from layerstore.private import private_dir, write_private
from snapshotter.fused.views import MountedView
from snapshotter.profile import Recorder

log = logging.getLogger(__name__)


class NotRecording(LiftoffError):
    """StopRecording of a view that is not being recorded."""


class Recordings:
    """The recordings under way, by view id."""

    def __init__(self, traces_dir: Path, learn_seconds: float = 0.0) -> None:
        self.traces_dir = traces_dir
        self.learn_seconds = learn_seconds
        self._recordings: dict[str, tuple[MountedView, Recorder]] = {}
        self._lock = threading.Lock()

    def start(self, mounted: MountedView) -> None:
        """Record the view's reads until stop() (a recording under way starts over)."""
        recorder = Recorder(mounted.view)
        with self._lock:
            self._recordings[mounted.id] = (mounted, recorder)
            mounted.record_reads(recorder.on_read)

    def stop(self, view_id: str) -> dict:
        """Stop recording; returns the trace (profile.py)."""
        with self._lock:
            recording = self._recordings.pop(view_id, None)
            if recording is None:
                raise NotRecording(f"view {view_id} is not being recorded")
            mounted, recorder = recording
            if mounted.on_read == recorder.on_read:
                mounted.record_reads(None)
        return recorder.trace()

    def learn(self, mounted: MountedView) -> None:
        """With --learn-seconds: record the first seconds of a fresh mount and keep the trace in traces/."""
        if self.learn_seconds <= 0:
            return
        recorder = Recorder(mounted.view, self.learn_seconds)
        mounted.record_reads(recorder.on_read)

        def save() -> None:
            time.sleep(self.learn_seconds)
            if mounted.on_read == recorder.on_read:
                mounted.record_reads(None)
            trace = recorder.trace()
            if not trace["chunks"]:
                return
            private_dir(self.traces_dir)
            path = self.traces_dir / f"{mounted.id}-{int(time.time())}.json"
            tmp = path.with_suffix(".tmp")
            tmp.unlink(missing_ok=True)
            write_private(tmp, json.dumps(trace).encode())
            os.rename(tmp, path)
            log.info(
                "view %s: kept a trace of the first %.0f s (%d chunks) in %s",
                mounted.id,
                self.learn_seconds,
                len(trace["chunks"]),
                path,
            )

        threading.Thread(target=save, name=f"learn-{mounted.id[:8]}", daemon=True).start()
