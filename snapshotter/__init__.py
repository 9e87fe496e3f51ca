"""liftoff snapshotter: a containerd proxy-plugin snapshotter with lazy remote layers."""
