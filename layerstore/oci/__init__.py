"""OCI images: references, media types, registry and image-layout access."""
