"""The Store interface: a flat namespace of immutable-by-convention objects."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

Bytes = bytes | bytearray | memoryview


class Store(abc.ABC):
    """A place that holds liftoff objects under string keys ("chunks/sha256/ab/ab..")."""

    url: str
    remote = False  # True when each request is a network round trip (sizes, puts run concurrently)

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; ObjectNotFound if absent, StoreError if the store fails."""

    @abc.abstractmethod
    def put(self, key: str, data: Bytes) -> None:
        """Write the object atomically: readers see the old object, or all of the new one."""

    @abc.abstractmethod
    def size(self, key: str) -> int | None:
        """The object's size in bytes, or None if it does not exist."""

    @abc.abstractmethod
    def list(self, prefix: str) -> Iterator[str]:
        """Keys that start with `prefix`, in no particular order."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object if it exists."""

    @abc.abstractmethod
    def modified(self, key: str) -> float | None:
        """When the object was last written (seconds since the epoch, the store's clock), or None if absent."""

    def list_sized(self, prefix: str) -> Iterator[tuple[str, int]]:
        """(key, size) of the keys that start with `prefix`."""
        for key in self.list(prefix):
            size = self.size(key)
            if size is not None:
                yield key, size

    def delete_many(self, keys: Iterable[str]) -> int:
        """delete() each key (in batches where the store allows); returns how many were asked."""
        count = 0
        for key in keys:
            self.delete(key)
            count += 1
        return count

    def sweep_temps(self) -> int:
        """Remove what killed writers left half-written (only call when no writer is active); returns the count."""
        return 0

    def sizes(self, keys: Iterable[str]) -> dict[str, int | None]:
        """size() of many keys at once (concurrently where the store is remote)."""
        return {key: self.size(key) for key in keys}

    def copy_to(self, key: str, dest: Store) -> int:
        """Copy one object to `dest` (server-side where both allow it); returns bytes copied."""
        data = self.get(key)
        dest.put(key, data)
        return len(data)

    def single_attempt(self, timeout: float) -> Store:
        """This store for a caller that retries itself: no retries beneath it, no call blocked past `timeout`
        seconds without an answer. Stores that neither retry nor wait on a network return themselves."""
        del timeout
        return self

    def prepare_writes(self) -> None:  # noqa: B027 - nothing to do for most stores
        """Get ready to be written to (a file store creates its directory)."""

    def sync(self) -> None:  # noqa: B027 - a no-op unless the store buffers writes
        """Make every completed put durable before dependent objects are written."""

    def close(self) -> None:  # noqa: B027 - a no-op unless the store holds resources
        """Release connections and threads."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def parallel_sizes(store: Store, keys: Iterable[str], pool: ThreadPoolExecutor) -> dict[str, int | None]:
    """size() of every key, run on `pool` (for stores where one lookup is a round trip)."""
    keys = list(keys)
    return dict(zip(keys, pool.map(store.size, keys), strict=True))
