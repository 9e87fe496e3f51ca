"""Several stores in priority order (own region first): reads fall through."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

from layerstore.errors import ObjectNotFound, StoreError
from layerstore.stores.base import Store

log = logging.getLogger(__name__)


class StoreChain:
    """Read from the first store that has an object; a store that errors is skipped."""

    def __init__(self, stores: Sequence[Store]) -> None:
        if not stores:
            raise StoreError("no store configured: pass --store URL")
        self.stores = list(stores)

    def get(self, key: str) -> bytes:
        """The object from the first store that has it."""
        errors: list[str] = []
        for store in self.stores:
            try:
                return store.get(key)
            except ObjectNotFound:
                continue
            except StoreError as e:
                log.warning("falling through: %s", e)
                errors.append(str(e))
        if errors:
            raise StoreError(f"{key}: no store could serve it: " + "; ".join(errors))
        raise ObjectNotFound(f"{key} not found in any store ({', '.join(s.url for s in self.stores)})")

    def list(self, prefix: str) -> Iterator[str]:
        """Keys under `prefix` in any store, each once."""
        seen: set[str] = set()
        for store in self.stores:
            try:
                for key in store.list(prefix):
                    if key not in seen:
                        seen.add(key)
                        yield key
            except StoreError as e:
                log.warning("skipping store in listing: %s", e)

    def close(self) -> None:
        """Close every store."""
        for store in self.stores:
            store.close()
