"""Replica compaction (`liftoff compact`), one job per module.

`model` (the cluster as data), `cluster` (reading it from a live Ray cluster), `planner` (which nodes
to empty, an integer program), `raypolicy` (Ray Serve 2.60's own rule, for comparison), `executor`
(drain through the GCS, let Serve migrate, release), `providers` (who takes emptied nodes back),
`state` (the in-flight plan), `controller` (the loop), `metrics`, `simulate` (trace-driven
comparison of policies) and `cli` (`liftoff compact ...`).
"""
