"""Child processes with a log file: what the commands that start other processes share.

`liftoff profile` starts a private containerd and snapshotter with these (snapshotter.localnode);
the dev stack (liftoff.devstack) starts its loopback servers with them too.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from layerstore.errors import LiftoffError


@dataclass
class Service:
    """A child process with a log file; stop() ends it."""

    name: str
    process: subprocess.Popen
    log_path: Path
    extra: dict = field(default_factory=dict)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def spawn(name: str, argv: list[str], workdir: Path, env: dict | None = None) -> Service:
    """Start `argv` as a child with stdin closed, stdout and stderr appended to WORKDIR/NAME.log."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    return Service(name, process, log_path)


def wait_for_socket(path: Path, service: Service, timeout: float) -> None:
    """Wait until `path` accepts a unix-socket connection; fail with the log's tail if `service` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise LiftoffError(
                f"{service.name} exited with code {service.process.returncode} before it was ready; log {service.log_path}:\n"
                + service.log()[-2000:]
            )
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(path))
                return
            except OSError:
                pass
        time.sleep(0.05)
    service.stop()
    raise LiftoffError(f"{service.name} did not listen on {path} within {timeout:.0f} s; log {service.log_path}")
