"""The conversion worker pool: at most N conversions at once, each a child process (registry_proxy.convert_job).

A worker claims the oldest due job, skips it if every store already has the image record, else runs the
child and records the result: done, retried after backoff (exit 1, a crash, a timeout), or failed for
good (exit 2: the image cannot be converted). Stopping the proxy kills running children and puts their
jobs back in the queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time

from layerstore.errors import LiftoffError
from layerstore.layout import image_key
from layerstore.stores import Store
from registry_proxy.config import ProxyConfig
from registry_proxy.convert_job import EXIT_PERMANENT
from registry_proxy.metrics import ProxyMetrics
from registry_proxy.queue import ConversionQueue, Job
from registry_proxy.source import TOKEN_ENV

log = logging.getLogger(__name__)


class ConversionWorkers:
    """N asyncio workers draining the queue."""

    def __init__(
        self, queue: ConversionQueue, config: ProxyConfig, stores: list[Store], proxy_url: str, token: str, metrics: ProxyMetrics
    ) -> None:
        self.queue = queue
        self.config = config
        self.stores = stores
        self.proxy_url = proxy_url
        self.token = token
        self.metrics = metrics
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(), name=f"convert-{i}") for i in range(max(1, self.config.convert_workers))]

    def wake(self) -> None:
        """A job was queued."""
        self._wake.set()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _work(self) -> None:
        while True:
            job = self.queue.claim()
            if job is None:
                due = self.queue.next_due()
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), max(0.05, due - time.time()) if due is not None else None)
                except TimeoutError:
                    pass
                continue
            try:
                await self._run(job)
            except asyncio.CancelledError:
                self.queue.requeue(job)
                raise
            except Exception as e:  # keep the worker alive; the job is retried
                log.exception("conversion of %s failed unexpectedly", job.name)
                self._failed(job, f"internal error: {e}", permanent=False)

    def _converted(self, digest: str) -> bool:
        return all(store.size(image_key(digest)) is not None for store in self.stores)

    async def _run(self, job: Job) -> None:
        try:
            if await asyncio.to_thread(self._converted, job.digest):
                log.info("conversion of %s: already in every store", job.name)
                self.queue.done(job, {"already_converted": True})
                self.metrics.conversions.labels("already_converted").inc()
                return
        except LiftoffError as e:
            self._failed(job, f"cannot check the stores: {e}", permanent=False)
            return
        log.info("converting %s (attempt %d)", job.name, job.attempts)
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            *self._argv(job),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, TOKEN_ENV: self.token},
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), self.config.convert_timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            self._failed(job, f"timed out after {self.config.convert_timeout:.0f} s", permanent=False)
            return
        except asyncio.CancelledError:
            process.kill()
            await process.wait()
            raise
        if process.returncode == 0:
            try:
                summary = json.loads(out)
            except ValueError:
                summary = {"output": out.decode(errors="replace")[-500:]}
            summary["seconds_total"] = round(time.monotonic() - started, 3)
            self.queue.done(job, summary)
            self.metrics.conversions.labels("converted").inc()
            log.info("converted %s in %.1f s", job.name, time.monotonic() - started)
            return
        lines = [line for line in err.decode(errors="replace").splitlines() if line.strip()]
        reason = lines[-1][:1000] if lines else f"the converter exited with status {process.returncode}"
        self._failed(job, reason, permanent=process.returncode == EXIT_PERMANENT)

    def _failed(self, job: Job, reason: str, permanent: bool) -> None:
        retry = self.queue.failed(job, reason, permanent)
        self.metrics.conversions.labels("retry" if retry else "failed").inc()
        log.warning(
            "conversion of %s failed (attempt %d, %s): %s", job.name, job.attempts, "will retry" if retry else "giving up", reason
        )

    def _argv(self, job: Job) -> list[str]:
        argv = [sys.executable, "-m", "registry_proxy.convert_job", "--proxy", self.proxy_url, "--upstream", job.upstream]
        argv += ["--repository", job.repository, "--digest", job.digest]
        if job.tag:
            argv += ["--tag", job.tag]
        for url in self.config.stores:
            argv += ["--store", url]
        options = self.config.store_options
        for flag, key in (("--endpoint-url", "endpoint_url"), ("--region", "region")):
            if options.get(key):
                argv += [flag, options[key]]
        if options.get("path_style"):
            argv.append("--path-style")
        for platform in self.config.platforms:
            argv += ["--platform", platform]
        return argv
