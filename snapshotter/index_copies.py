"""Local copies of layer indexes: checking one, and fetching a corrupt one again from the stores.

The snapshotter copies each remote layer's index to local disk at pull time; the FUSE daemon builds
views from those copies alone (so it restarts without a store). A copy can still go bad on the node
(a torn write after a crash, a bad block) while the store's copy is fine: then the cure is to fetch it
again, not a new conversion. Only when the stores' copies are bad too is the conversion at fault.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from layerstore.errors import FormatError, ObjectNotFound, StoreError
from layerstore.index import REMEDY, decode_index
from layerstore.layout import layer_index_key
from layerstore.pb.liftoff.index.v1 import index_pb2 as pb
from layerstore.stores import Store

log = logging.getLogger(__name__)


def decode_copy(data: bytes, digest: str, where: str, check_extents: bool, remedy: str = "") -> pb.LayerIndex:
    """Parse an index copy and check that it is the index of layer `digest`; FormatError otherwise."""
    index = decode_index(data, where, check_extents, remedy=remedy)
    if index.layer_digest and index.layer_digest != digest:
        tail = f"; {remedy}" if remedy else ""
        raise FormatError(f"{where}: holds the index of layer {index.layer_digest}, not of {digest}{tail}")
    return index


def fetch_again(
    stores: Sequence[Store], digest: str, local_error: FormatError, check_extents: bool
) -> tuple[bytes, pb.LayerIndex]:
    """The index of layer `digest` from the first store whose copy is sound, after the local copy
    failed with `local_error`. FormatError if no store's copy is sound (or none has it), StoreError
    if none could be read; either message says what was wrong with the local copy too."""
    key = layer_index_key(digest)
    bad: list[str] = []
    unreachable: list[str] = []
    missing: list[str] = []
    for store in stores:
        try:
            data = store.get(key)
        except ObjectNotFound:
            missing.append(store.url)
            continue
        except StoreError as e:
            unreachable.append(str(e))
            continue
        try:
            index = decode_copy(data, digest, f"{store.url}/{key}", check_extents)
        except FormatError as e:
            bad.append(str(e))
            continue
        log.warning("%s; fetched it again from %s", local_error, store.url)
        return data, index
    if bad:
        raise FormatError(f"{local_error}, and so is the store's copy: {'; '.join(bad)}; {REMEDY}")
    if unreachable:
        raise StoreError(
            f"{local_error}, and the store cannot be reached to fetch it again ({'; '.join(unreachable)}): "
            "it is fetched again once the store answers"
        )
    where = ", ".join(missing) or "no store configured"
    raise FormatError(f"{local_error}, and the store no longer has this layer ({where}): convert the image again")
