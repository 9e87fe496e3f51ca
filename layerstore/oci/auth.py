"""Registry credentials from a docker config file (~/.docker/config.json), as docker reads them."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path

from layerstore.errors import RegistryError
from layerstore.oci.reference import DOCKER_HUB, DOCKER_HUB_API

_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", DOCKER_HUB, DOCKER_HUB_API)


def default_config_path() -> Path:
    """$DOCKER_CONFIG/config.json, else ~/.docker/config.json."""
    base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return Path(base) / "config.json"


class DockerCredentials:
    """Look up (username, password) for a registry host in a docker config file."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path else default_config_path()
        self._config: dict = {}
        if self.path.exists():
            try:
                self._config = json.loads(self.path.read_text())
            except (OSError, ValueError) as e:
                raise RegistryError(f"cannot read docker config {self.path}: {e}") from None

    def lookup(self, registry: str) -> tuple[str, str] | None:
        """Credentials for `registry` (host[:port]), or None for anonymous access."""
        keys = _HUB_KEYS if registry in _HUB_KEYS else (registry, f"https://{registry}", f"http://{registry}")
        helper = (self._config.get("credHelpers") or {}).get(registry) or self._config.get("credsStore")
        if helper:
            found = self._from_helper(helper, keys[0])
            if found:
                return found
        auths = self._config.get("auths") or {}
        for key in keys:
            entry = auths.get(key) or auths.get(key.rstrip("/"))
            if not entry:
                continue
            if entry.get("auth"):
                try:
                    user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
                except ValueError:
                    raise RegistryError(f"docker config {self.path}: 'auth' for {key} is not base64 user:password") from None
                return user, password
            if entry.get("username"):
                return entry["username"], entry.get("password", "")
        return None

    def _from_helper(self, helper: str, server: str) -> tuple[str, str] | None:
        try:
            done = subprocess.run([f"docker-credential-{helper}", "get"], input=server.encode(), capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if done.returncode != 0:
            return None
        try:
            found = json.loads(done.stdout)
            return found["Username"], found["Secret"]
        except (ValueError, KeyError):
            return None
