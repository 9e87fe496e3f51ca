"""layerstore: liftoff's shared foundation.

The chunked, content-addressed store format (layer indexes, chunks, chain and
image records), the stores that hold it (file://, s3://), tar parsing and
chunking, OCI registry access, and the `liftoff` command line.
"""

__version__ = "0.1.0"
CONVERTER = f"liftoff {__version__}"
