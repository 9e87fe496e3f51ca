"""file:// stores: a directory tree, written with temp file + rename."""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from layerstore.errors import ObjectNotFound, StoreError
from layerstore.stores.base import Bytes, Store

TMP_MARK = ".tmp-"


class FileStore(Store):
    """Objects as files under `root`; a put is a temp file renamed into place."""

    def __init__(self, root: str | os.PathLike[str], durable: bool = True) -> None:
        self.root = Path(root).absolute()
        self.url = f"file://{self.root}"
        self.durable = durable
        self._dirs: set[Path] = set()

    def prepare_writes(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the store directory {self.root}: {e.strerror}") from e

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise StoreError(f"invalid object key {key!r}")
        return self.root / key

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            if not self.root.is_dir():
                raise StoreError(
                    f"store {self.url} is unreachable: {self.root} does not exist (is its volume mounted?)"
                ) from None
            raise ObjectNotFound(f"{key} not found in {self.url}") from None
        except OSError as e:
            raise StoreError(f"cannot read {key} from {self.url}: {e.strerror}") from e

    def put(self, key: str, data: Bytes) -> None:
        path = self._path(key)
        parent = path.parent
        if parent not in self._dirs:
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create {parent} in {self.url}: {e.strerror}") from e
            self._dirs.add(parent)
        tmp = parent / f"{TMP_MARK}{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileNotFoundError:  # its directory was removed since (liftoff gc): make it again
                parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            hint = ": the disk is full" if e.errno == errno.ENOSPC else ""
            raise StoreError(f"cannot write {key} to {self.url}: {e.strerror}{hint}") from e

    def size(self, key: str) -> int | None:
        try:
            return os.stat(self._path(key)).st_size
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"cannot stat {key} in {self.url}: {e.strerror}") from e

    def list(self, prefix: str) -> Iterator[str]:
        base, _, name_prefix = prefix.rpartition("/")
        start = self.root / base if base else self.root
        if not start.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(start):
            rel = os.path.relpath(dirpath, self.root)
            rel = "" if rel == "." else rel + "/"
            for name in filenames:
                key = rel + name
                if TMP_MARK not in name and key.startswith(prefix):
                    yield key
            if dirpath == str(start) and name_prefix:
                dirnames[:] = [d for d in dirnames if d.startswith(name_prefix)]

    def list_sized(self, prefix: str) -> Iterator[tuple[str, int]]:
        for key in self.list(prefix):
            try:
                yield key, os.stat(self.root / key).st_size
            except FileNotFoundError:
                continue

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        if path.parent != self.root:
            try:
                path.parent.rmdir()  # only if that left it empty (a removed layer's directory); put() makes it again
            except OSError:
                pass

    def modified(self, key: str) -> float | None:
        try:
            return os.stat(self._path(key)).st_mtime
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"cannot stat {key} in {self.url}: {e.strerror}") from e

    def sweep_temps(self) -> int:
        removed = 0
        for dirpath, _, filenames in os.walk(self.root):
            for name in filenames:
                if TMP_MARK in name:
                    Path(dirpath, name).unlink(missing_ok=True)
                    removed += 1
        return removed

    def sync(self) -> None:
        if not self.durable or not self.root.exists():
            return
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _libc.syncfs(fd) != 0:
                raise StoreError(f"syncfs failed on {self.url}: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)
