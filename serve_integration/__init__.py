"""Ray Serve integration: vLLM replicas on liftoff, and replica compaction."""
