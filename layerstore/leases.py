"""Store leases: writers and `liftoff gc` never work on one store at the same time.

A writer (convert, replicate, a profile's relayout) relies on objects that are in
the store but not referenced yet: chunks it found already uploaded, indexes of a
layer it shares. `liftoff gc` deletes what no image references. So each side
holds a lease while it works: a small object `leases/<kind>-<host>-<pid>-<token>`,
re-written every `ttl / 6` seconds and deleted when the work ends. A lease whose
last write is older than `ttl` (by the store's own clock, read from the caller's
freshly written lease) belongs to a process that died; it is ignored, and gc
deletes it.

Both sides write their lease first and then list the others'. On a store whose
listings show completed writes (S3 since 2020, a local filesystem) at least one of
two racing parties sees the other: gc then gives way (it changes nothing and says
so), and a writer waits until gc is done.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from layerstore.errors import Busy, ObjectNotFound, StoreError
from layerstore.stores.base import Store

log = logging.getLogger(__name__)

LEASES = "leases/"
DEFAULT_TTL = 120.0  # seconds without a heartbeat before a lease counts as its holder's death
WRITE, GC = "write", "gc"


class StoreBusy(StoreError, Busy):
    """The store is leased by the other side (gc, or writers): nothing was changed (exit 3: retry later)."""

    error_code = "busy"


class Lease:
    """This process's lease on some stores, kept fresh by a heartbeat thread."""

    def __init__(self, stores: list[Store], kind: str, what: str, ttl: float = DEFAULT_TTL) -> None:
        self.stores = stores
        self.kind = kind
        self.ttl = ttl
        self.key = f"{LEASES}{kind}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.body = json.dumps(
            {
                "kind": kind,
                "what": what,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "since": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        ).encode()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._written: list[Store] = []  # where acquire() got to write it

    def acquire(self) -> None:
        """Write the lease to every store and start the heartbeat."""
        for store in self.stores:
            store.prepare_writes()
            store.put(self.key, self.body)
            self._written.append(store)
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.kind}", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 6):
            for store in self.stores:
                try:
                    store.put(self.key, self.body)
                except StoreError as e:
                    log.warning("cannot renew the %s lease %s in %s: %s", self.kind, self.key, store.url, e)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease (best effort: an undeleted one expires after ttl)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for store in self._written:
            try:
                store.delete(self.key)
            except StoreError as e:
                log.warning("cannot delete the lease %s in %s (it expires by itself): %s", self.key, store.url, e)

    def others(self, store: Store, kind: str | None = None) -> tuple[list[dict], list[str]]:
        """The live leases of other holders in `store` (of `kind`, if given), and the keys of expired ones."""
        store.put(self.key, self.body)  # renew first: its time is the store's "now"
        now = store.modified(self.key)
        if now is None:
            raise StoreError(f"{store.url} did not read back the lease {self.key} just written: leases need a consistent store")
        live, expired = [], []
        for key in store.list(LEASES):
            if key == self.key:
                continue
            written = store.modified(key)
            if written is None:
                continue  # released meanwhile
            if now - written > self.ttl:
                expired.append(key)
                continue
            try:
                info = json.loads(store.get(key))
            except ObjectNotFound:
                continue
            except ValueError:
                info = {"kind": key[len(LEASES) :].split("-", 1)[0], "what": "?"}
            if kind is None or info.get("kind") == kind:
                live.append({**info, "key": key, "age_s": round(now - written, 1)})
        return live, expired


def describe(leases: list[dict]) -> str:
    """One line for people: who holds these leases."""
    return "; ".join(
        f"{x.get('what', '?')} (host {x.get('host', '?')}, pid {x.get('pid', '?')}, since {x.get('since', '?')})" for x in leases
    )


@contextmanager
def writing(stores: list[Store], what: str, wait_s: float = 900.0, ttl: float = DEFAULT_TTL) -> Iterator[Lease]:
    """Hold a writer's lease on `stores` for the block; waits (up to `wait_s`) while a gc runs on one of them."""
    lease = Lease(stores, WRITE, what, ttl)
    try:
        lease.acquire()
        deadline = time.monotonic() + wait_s
        for store in stores:
            while True:
                gcs, _ = lease.others(store, GC)
                if not gcs:
                    break
                if time.monotonic() > deadline:
                    raise StoreBusy(
                        f"liftoff gc holds {store.url}: {describe(gcs)}; waited {wait_s:.0f} s. Run again when it is "
                        f"done (a gc that died releases the store {ttl:.0f} s after its last heartbeat)"
                    )
                log.info("waiting for liftoff gc to finish on %s: %s", store.url, describe(gcs))
                time.sleep(min(2.0, ttl / 6))
        yield lease
    finally:
        lease.release()


@contextmanager
def collecting(store: Store, ttl: float = DEFAULT_TTL) -> Iterator[tuple[Lease, list[str]]]:
    """Hold gc's lease on `store` for the block, or raise StoreBusy (changing nothing) while a writer works.

    Yields the lease and the keys of expired leases (what dead processes left behind)."""
    lease = Lease([store], GC, "liftoff gc", ttl)
    try:
        lease.acquire()
        others, expired = lease.others(store)
        if others:
            writers = [x for x in others if x.get("kind") != GC]
            kind = "writer(s)" if writers else "other gc(s)"
            raise StoreBusy(
                f"{len(others)} {kind} active on {store.url}: {describe(others)}. gc changed nothing: run it again later"
            )
        yield lease, expired
    finally:
        lease.release()
