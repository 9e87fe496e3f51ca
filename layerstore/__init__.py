"""layerstore: liftoff's shared foundation.

The chunked, content-addressed store format (layer indexes, chunks, chain and
image records), the stores that hold it (file://, s3://), tar parsing and
chunking, OCI registry access. It imports no component and nothing from `liftoff`
(pyproject.toml's import-linter contracts). A weights-only install ships only this
file, errors, retry, s3url and units of it: keep it import-light.
"""

__version__ = "0.1.0"
CONVERTER = f"liftoff {__version__}"
