"""liftoff proxy: a pull-through, caching, converting OCI registry mirror for containerd."""
