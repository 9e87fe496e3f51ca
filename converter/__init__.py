"""liftoff convert: OCI images into the chunked, content-addressed store format."""
