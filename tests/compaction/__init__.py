"""Replica compaction for Ray Serve: planner, Ray's rule, simulator, and live clusters."""
