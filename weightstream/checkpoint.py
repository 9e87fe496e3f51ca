"""Finding a checkpoint's files (single, sharded with an index) and reading their headers and manifest."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from weightstream.errors import CheckpointFormatError, CheckpointNotFound
from weightstream.format import PREFIX_BYTES, Header, header_length, parse_header
from weightstream.httpreader import ObjectRef
from weightstream.options import HEADER_PROBE_BYTES
from weightstream.sources import Location

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


@dataclass
class CheckpointFile:
    """One safetensors object and its validated header."""

    name: str
    ref: ObjectRef
    header: Header


def _check_relative(name: object, where: str) -> str:
    if not isinstance(name, str) or not name or name.startswith("/") or ".." in name.split("/"):
        raise CheckpointFormatError(f"{where}: shard name {name!r} must be a relative path inside the checkpoint")
    return name


def parse_index(data: bytes, where: str) -> dict[str, str]:
    """The weight_map of a model.safetensors.index.json: tensor name -> shard file name."""
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise CheckpointFormatError(f"{where}: not valid JSON ({str(e)[:200]})") from None
    except RecursionError:
        raise CheckpointFormatError(f"{where}: JSON nested too deeply to be an index: corrupt or hostile file") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointFormatError(f'{where}: needs a non-empty "weight_map" object (tensor name -> shard file)')
    for tensor, shard in weight_map.items():
        _check_relative(shard, f"{where}: tensor {tensor!r}")
    return weight_map


def discover(location: Location) -> tuple[list[str], dict[str, str] | None, str | None]:
    """(shard names in order, the index's weight_map or None, the index's name or None)."""
    if location.explicit and location.explicit.endswith(".json"):
        weight_map = parse_index(location.read_small(location.explicit), location.url + location.explicit)
        return sorted(set(weight_map.values())), weight_map, location.explicit
    if location.explicit:
        return [location.explicit], None, None
    # The conventional names first: no listing needed (nor the permission to list, nor a server that can).
    if location.exists(INDEX):
        weight_map = parse_index(location.read_small(INDEX), location.url + INDEX)
        return sorted(set(weight_map.values())), weight_map, INDEX
    if location.exists(SINGLE):
        return [SINGLE], None, None
    names = location.names()
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    index = INDEX if INDEX in names else (indexes[0] if len(indexes) == 1 else None)
    if index:
        weight_map = parse_index(location.read_small(index), location.url + index)
        return sorted(set(weight_map.values())), weight_map, index
    if SINGLE in names:
        return [SINGLE], None, None
    files = [n for n in names if n.endswith(".safetensors")]
    if files:
        return files, None, None
    raise CheckpointNotFound(f"no safetensors checkpoint under {location.url}: expected {SINGLE}, {INDEX} or *.safetensors there")


def read_header(location: Location, name: str, probe: int = HEADER_PROBE_BYTES) -> CheckpointFile:
    """One ranged GET for the length and (nearly always) the whole header; a second only for huge headers."""
    ref = location.ref(name)
    head, size = location.reader.read_head(ref, probe)
    n = header_length(head, size, ref.name)
    if PREFIX_BYTES + n > len(head):
        rest = bytearray(PREFIX_BYTES + n - len(head))
        location.reader.read_into(ref, len(head), [memoryview(rest)])
        head = head + bytes(rest)
    return CheckpointFile(name, ref, parse_header(head, size, ref.name))


def check_index(files: list[CheckpointFile], weight_map: dict[str, str] | None, index_url: str) -> None:
    """Every tensor once across shards; every index entry present in the shard it names."""
    where: dict[str, str] = {}
    for f in files:
        for t in f.header.tensors:
            if t.name in where:
                raise CheckpointFormatError(
                    f"tensor {t.name!r} is in both {where[t.name]} and {f.ref.name}: ambiguous checkpoint"
                )
            where[t.name] = f.ref.name
    if weight_map:
        by_name = {f.name: f for f in files}
        for tensor, shard in weight_map.items():
            if tensor not in by_name[shard].header.by_name():
                raise CheckpointFormatError(f"{index_url} maps tensor {tensor!r} to {shard}, but that shard does not contain it")


def parse_manifest(data: bytes, where: str) -> dict[str, str]:
    """sha256 per file name: JSON {"name": "hex"} or `sha256sum` output ("hex  name" lines)."""
    text = data.decode("utf-8", errors="replace").strip()
    result: dict[str, str] = {}
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise CheckpointFormatError(f"{where}: manifest is not valid JSON ({str(e)[:200]})") from None
        except RecursionError:
            raise CheckpointFormatError(f"{where}: manifest JSON nested too deeply: corrupt or hostile file") from None
        items = doc.items() if isinstance(doc, dict) else []
    else:
        items = []
        for line in text.splitlines():
            if line.strip():
                digest, _, name = line.strip().partition(" ")
                items.append((name.strip().lstrip("*"), digest))
    for name, digest in items:
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise CheckpointFormatError(f"{where}: entry {name!r} is not a 64-hex-digit sha256")
        result[name] = digest.lower()
    if not result:
        raise CheckpointFormatError(f"{where}: the manifest lists no files")
    return result


def load_manifest(spec: Mapping[str, str] | str, location: Location) -> dict[str, str]:
    """A manifest given inline (name -> sha256), as a local absolute path, or as an object name in the checkpoint's location."""
    if isinstance(spec, Mapping):
        return parse_manifest(json.dumps(dict(spec)).encode(), "sha256 manifest")
    if os.path.isabs(spec):
        try:
            with open(spec, "rb") as f:
                return parse_manifest(f.read(), spec)
        except OSError as e:
            raise CheckpointNotFound(f"cannot read the sha256 manifest {spec}: {e.strerror}") from None
    return parse_manifest(location.read_small(spec), location.url + spec)
