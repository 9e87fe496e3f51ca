"""Object keys of the store layout (DESIGN.md section 2).

chunks/sha256/<2 hex>/<64 hex>    one zstd frame, named by the sha256 of its uncompressed bytes
layers/sha256/<64 hex>/index      a layer's index (protobuf, zstd), by the OCI layer digest
chains/sha256/<64 hex>            chainID -> layer record (JSON)
images/sha256/<64 hex>            image record per manifest or index digest (JSON)
"""

from __future__ import annotations

from layerstore.digests import hex_of

CHUNKS = "chunks/sha256/"
LAYERS = "layers/sha256/"
CHAINS = "chains/sha256/"
IMAGES = "images/sha256/"


def chunk_key(sha256: bytes) -> str:
    """Key of the chunk whose uncompressed content has this raw sha256."""
    h = sha256.hex()
    return f"{CHUNKS}{h[:2]}/{h}"


def layer_index_key(layer_digest: str) -> str:
    """Key of the index of the OCI layer blob `layer_digest`."""
    return f"{LAYERS}{hex_of(layer_digest)}/index"


def chain_key(chain_id: str) -> str:
    """Key of the chain record for `chain_id`."""
    return f"{CHAINS}{hex_of(chain_id)}"


def image_key(manifest_digest: str) -> str:
    """Key of the image record of a manifest (or image index) digest."""
    return f"{IMAGES}{hex_of(manifest_digest)}"


def digest_from_key(key: str, prefix: str) -> str:
    """Inverse of chain_key/image_key/layer_index_key: the digest a key names."""
    rest = key[len(prefix) :]
    return "sha256:" + rest.split("/", 1)[0]
