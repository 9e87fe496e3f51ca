"""A userspace network shaper: a TCP proxy adding first-byte latency per request and bandwidth caps.

This machine has no `tc netem`, so benchmarks put this proxy in front of a
server to emulate a remote store, identically for every contender:

- latency: every chunk the client sends (a request) reaches the server
  `latency` seconds later, so each request's first byte comes back that much
  later, also on keep-alive connections; reading is not blocked meanwhile.
- conn_rate / total_rate: token buckets (bytes/s) on the server->client
  direction, per connection and shared by all connections.

Use it in-process:

    with ShapingProxy(("127.0.0.1", 8080), SHAPED) as proxy:
        url = f"http://127.0.0.1:{proxy.port}/"

or as a child process (`ProxyProcess`, or `python benchmarks/shaping_proxy.py
--upstream 127.0.0.1:8080 --latency-ms 20 --conn-mbps 100 --total-mbps 1000`,
which prints `listening on PORT`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

CHUNK = 256 * 1024


@dataclass(frozen=True)
class Shaping:
    """latency in seconds per request; rates in bytes per second (None: uncapped)."""

    latency: float = 0.0
    conn_rate: float | None = None
    total_rate: float | None = None

    @property
    def label(self) -> str:
        if not self.latency and not self.conn_rate and not self.total_rate:
            return "unshaped"
        parts = [f"{self.latency * 1000:g} ms"]
        if self.conn_rate:
            parts.append(f"{self.conn_rate / 1e6:g} MB/s per connection")
        if self.total_rate:
            parts.append(f"{self.total_rate / 1e9:g} GB/s total")
        return " + ".join(parts)

    def argv(self) -> list[str]:
        """Command-line options that reproduce this shaping."""
        argv = ["--latency-ms", f"{self.latency * 1000:g}"]
        if self.conn_rate:
            argv += ["--conn-mbps", f"{self.conn_rate / 1e6:g}"]
        if self.total_rate:
            argv += ["--total-mbps", f"{self.total_rate / 1e6:g}"]
        return argv


UNSHAPED = Shaping()
SHAPED = Shaping(latency=0.020, conn_rate=100e6, total_rate=1e9)  # a remote object store, roughly
SEED_SHAPED = Shaping(latency=0.020, conn_rate=100e6, total_rate=1.25e9)  # the seeds' setting: a node's 10 Gb/s link


class TokenBucket:
    """Paces bytes at `rate` with bursts up to `burst` bytes (a GCRA: one timestamp, no background task)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.window = burst / rate
        self._tat = time.monotonic()

    def reserve(self, nbytes: int) -> float:
        """Account for `nbytes` now; returns how long to wait before sending them."""
        now = time.monotonic()
        self._tat = max(self._tat, now) + nbytes / self.rate
        return max(0.0, self._tat - now - self.window)


@dataclass
class ProxyStats:
    connections: int = 0
    client_writes: int = 0  # roughly one per request
    bytes_down: int = 0
    bytes_up: int = 0


@dataclass
class ShapingProxy:
    """The proxy in a background thread of this process; `port` is set once start() returns."""

    upstream: tuple[str, int]
    shaping: Shaping = UNSHAPED
    host: str = "127.0.0.1"
    port: int = 0
    stats: ProxyStats = field(default_factory=ProxyStats)

    def __post_init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._total = TokenBucket(self.shaping.total_rate, CHUNK * 4) if self.shaping.total_rate else None

    # -- the pumps -------------------------------------------------------------------------------------
    async def _up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """client -> server, each chunk delayed by the latency (a queue keeps reading meanwhile)."""
        queue: asyncio.Queue = asyncio.Queue()

        async def delayed() -> None:
            while True:
                arrived, data = await queue.get()
                if data is None:
                    break
                wait = arrived + self.shaping.latency - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
            with contextlib.suppress(OSError):
                writer.write_eof()

        sender = asyncio.ensure_future(delayed())
        try:
            while data := await reader.read(CHUNK):
                self.stats.client_writes += 1
                self.stats.bytes_up += len(data)
                queue.put_nowait((time.monotonic(), data))
        finally:
            queue.put_nowait((0.0, None))
            with contextlib.suppress(OSError, ConnectionError):
                await sender

    async def _down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """server -> client, paced by the per-connection and total buckets."""
        conn = TokenBucket(self.shaping.conn_rate, CHUNK * 2) if self.shaping.conn_rate else None
        while data := await reader.read(CHUNK):
            wait = 0.0
            if conn is not None:
                wait = conn.reserve(len(data))
            if self._total is not None:
                wait = max(wait, self._total.reserve(len(data)))
            if wait > 0:
                await asyncio.sleep(wait)
            self.stats.bytes_down += len(data)
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.close()
            return
        tasks = [
            asyncio.ensure_future(self._up(client_reader, server_writer)),
            asyncio.ensure_future(self._down(server_reader, client_writer)),
        ]
        try:
            await asyncio.gather(*tasks)
        except (OSError, ConnectionError):
            pass
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for w in (client_writer, server_writer):
                w.close()
                with contextlib.suppress(OSError, ConnectionError, asyncio.CancelledError):
                    await w.wait_closed()

    # -- lifecycle -------------------------------------------------------------------------------------
    async def serve(self, ready: threading.Event | None = None) -> None:
        """Listen and proxy until the loop is stopped."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=CHUNK * 4)
        self.port = self._server.sockets[0].getsockname()[1]
        if ready is not None:
            ready.set()
        async with self._server:
            await self._server.serve_forever()

    def start(self) -> int:
        """Serve from a daemon thread running its own event loop; returns the listening port."""
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="shaping-proxy", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.serve(ready), self._loop)
        if not ready.wait(10):
            raise RuntimeError("the shaping proxy did not start listening within 10 s")
        return self.port

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        """Close the listener and every proxied connection, then the loop."""
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> ShapingProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ProxyProcess:
    """The proxy as a child process (its own interpreter and core); `port` is set once started."""

    def __init__(self, upstream: tuple[str, int], shaping: Shaping = UNSHAPED) -> None:
        argv = [sys.executable, __file__, "--upstream", f"{upstream[0]}:{upstream[1]}", *shaping.argv()]
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline() if self.process.stdout else ""
        if not line.startswith("listening on "):
            self.process.kill()
            raise RuntimeError(f"the shaping proxy failed to start: {line!r}")
        self.port = int(line.split()[-1])
        self.shaping = shaping

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the server to shape")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: any free one)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added first-byte latency per request")
    parser.add_argument("--conn-mbps", type=float, help="cap per connection, MB/s (10^6 bytes)")
    parser.add_argument("--total-mbps", type=float, help="cap over all connections, MB/s")
    args = parser.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    shaping = Shaping(
        args.latency_ms / 1000,
        args.conn_mbps * 1e6 if args.conn_mbps else None,
        args.total_mbps * 1e6 if args.total_mbps else None,
    )
    proxy = ShapingProxy((host, int(port)), shaping, port=args.port)
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    loop.add_signal_handler(signal.SIGINT, loop.stop)
    task = loop.create_task(proxy.serve(ready))

    async def announce() -> None:
        while not ready.is_set():
            await asyncio.sleep(0.01)
        print(f"listening on {proxy.port}", flush=True)

    announcer = loop.create_task(announce())
    try:
        loop.run_forever()
    finally:
        task.cancel()
        announcer.cancel()
        with contextlib.suppress(asyncio.CancelledError, RuntimeError):
            loop.run_until_complete(task)
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
