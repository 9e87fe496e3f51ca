"""liftoff: the `liftoff` command (`cli`), the demo (`demo`) and the loopback dev stack (`devstack`).

The top layer: it may import every component (converter, snapshotter, registry_proxy,
weightstream, serve_integration) and the foundation (layerstore); nothing imports it.
"""
