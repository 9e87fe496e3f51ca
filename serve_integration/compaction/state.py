"""The in-flight plan, persisted so a controller killed mid-plan resumes or rolls back cleanly.

One record per cluster: the plan, the wave in progress and its phase. The executor writes it
*before* each irreversible step (a drain), so after a crash the record never claims less than was
done. Two stores: Ray's internal key-value store in the GCS (the default: it lives exactly as long
as the cluster) or a JSON file (written atomically).

Phases: planned -> draining (wave k) -> releasing (wave k) -> ... -> done | aborted.
"""

from __future__ import annotations

import json
import os
import socket
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

KV_NAMESPACE = "liftoff"
KV_KEY = "compaction/in-flight"
RECORD_VERSION = 1


class StateStore(ABC):
    @abstractmethod
    def load(self) -> dict | None: ...

    @abstractmethod
    def save(self, record: dict) -> None: ...

    @abstractmethod
    def clear(self) -> None: ...


class FileStore(StateStore):
    """A JSON file, replaced atomically (write, fsync, rename)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def load(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise ValueError(f"state file {self.path} is corrupt ({e}); inspect it, then delete it to start afresh") from None

    def save(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


class KVStore(StateStore):
    """Ray's internal KV in the GCS (survives controller restarts, goes with the cluster)."""

    def __init__(self, cluster: Any, key: str = KV_KEY, namespace: str = KV_NAMESPACE):
        self.cluster = cluster
        self.key = key
        self.namespace = namespace

    def load(self) -> dict | None:
        raw = self.cluster.kv_get(self.key, self.namespace)
        return json.loads(raw) if raw else None

    def save(self, record: dict) -> None:
        self.cluster.kv_put(self.key, json.dumps(record).encode(), self.namespace)

    def clear(self) -> None:
        self.cluster.kv_del(self.key, self.namespace)


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Journal:
    """The record of the plan in flight, on top of a store."""

    def __init__(self, store: StateStore, owner: str | None = None, cluster_id: str = ""):
        self.store = store
        self.owner = owner or owner_id()
        self.cluster_id = cluster_id

    def load(self) -> dict | None:
        record = self.store.load()
        if record is not None and record.get("version") != RECORD_VERSION:
            raise ValueError(f"in-flight compaction record has version {record.get('version')}, expected {RECORD_VERSION}")
        return record

    def begin(self, plan: dict) -> dict:
        record = {
            "version": RECORD_VERSION,
            "cluster_id": self.cluster_id,
            "owner": self.owner,
            "plan": plan,
            "phase": "planned",
            "wave": -1,
            "nodes": [],
            "deadline_ms": 0,
            "wave_started_at": 0.0,
            "released": [],
            "history": [],
            "updated_at": time.time(),
        }
        self.store.save(record)
        return record

    def update(self, record: dict, **fields: Any) -> dict:
        record.update(fields)
        record["owner"] = self.owner
        record["updated_at"] = time.time()
        record.setdefault("history", []).append(
            {"at": record["updated_at"], **{k: v for k, v in fields.items() if k != "history"}}
        )
        self.store.save(record)
        return record

    def clear(self) -> None:
        self.store.clear()
