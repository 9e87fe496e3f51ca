"""`liftoff fused`: the long-lived FUSE daemon that serves remote layers, one job per module.

    indexes.py    local copies of layer indexes (a corrupt copy is fetched again)
    views.py      view lifecycle: mount, unmount, restore at start from views/*.json
    recording.py  recording a view's reads (liftoff profile, --learn-seconds)
    retention.py  dropping the cached chunks and indexes of removed layers
    fdstore.py    where the views' /dev/fuse descriptors outlive the daemon (systemd, fd holder)
    control.py    the liftoff.fused.v1 gRPC service on fused.sock (proto/liftoff/fused/v1)
    daemon.py     wiring it together, startup and the run loop

It runs apart from the gRPC snapshotter (its own process group and systemd unit with
KillMode=process), so restarting the snapshotter never touches a running container's
mounts. State lives under its root:

    fused.sock        control socket (gRPC, liftoff.fused.v1; client: snapshotter/fuse_control.py)
    fused.lock        held while a daemon serves this root
    indexes/<hex>     layer indexes, written by the snapshotter at pull time
    views/<id>.json   the views to serve; re-mounted at start from these alone
    mnt/<id>/         mount points
    cache/chunks/     the chunk cache (layerstore/cache.py)
    traces/           traces of --learn-seconds

All of it is root's alone (directories 0700, files 0600, layerstore/private.py), as
containerd keeps its own snapshotter state, and views are mounted nosuid,nodev: a non-root
user of the node reaches no image bytes. Containers are unaffected (overlayfs reaches its
lower layers with the credentials of whoever mounted it, and checks setuid bits and device
nodes on its own mount).

A restart needs no store: views come back from the local indexes, and only reads of
chunks not yet cached wait for the stores (retrying) once they answer again. Nor does it end
a running container's mounts: each view's /dev/fuse descriptor is kept in an fd store
(fdstore.py: systemd's, or `liftoff fdholder`), and the next daemon re-attaches to the same
connections (views.py), or takes them over from a running one (Handover, --takeover).
"""
